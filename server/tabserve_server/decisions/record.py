"""What goes in a decision record: one per answered scoring call, built from what the data plane already has
(the call's `RequestContext`, its validated rows, its `ScoreResult`), never from a second computation; the
data plane's hook that submits it (`DecisionRecorder`), and `decision_records` to read them back. The call
hands over those pieces and its answer time only; the log's writer thread builds the record from them, so the
dicts, digests and time formatting cost the call nothing (the pieces are never changed after the call).

A record (the log adds its own fields: kind "decision", format version, sequence, previous hash, hash,
worker; chain.py):

    time              UTC, ISO 8601 with microseconds, when the call was answered
    request_id        the call's request id (transport/request_id.py)
    repeat            true when this worker answered the same request id before (a retry whose first answer
                      was lost, or a caller reusing an id), among its last RECENT_REQUEST_IDS ids
    caller            {"identity": <client certificate SAN>} under mutual TLS, else {"peer": <address>}
    model, version, model_digest, flavor
    backend           the prediction backend that produced the scores (core/model.py BACKEND_*)
    threshold, threshold_source
    positive_label, negative_label   what decision true / false mean for this version
    inputs            how rows carry their input: "digest", "full" or "none" (the decision_log_inputs setting)
    explain           with reasons asked for: {"top_k", "all_rows", "expected_value"}
    rows              per row: score, decision (true: score >= threshold), and
                      input_sha256 (digest: SHA-256 of the row's float64 little-endian values in the model's
                      feature order), or input (full: the values, null for NaN), and
                      reasons when the row was explained: [{feature, value, contribution, code}, ...]

Floats are written as JSON numbers that read back to the same bits (NaN, which JSON lacks, as null); that is
what lets `tabserve-admin decisions replay` compare scores bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np

from tabserve_server.core.dataplane import RequestContext, ScoreResult
from tabserve_server.core.reasons import ExplainOptions, RowExplanation
from tabserve_server.core.schema import FloatMatrix
from tabserve_server.decisions.log import DecisionLog, DecisionLogUnavailable
from tabserve_server.decisions.sink import numbered_files
from tabserve_server.errors import DecisionNotRecorded

INPUT_DIGEST: Final = "digest"
INPUT_FULL: Final = "full"
INPUT_NONE: Final = "none"
INPUT_MODES: Final = (INPUT_DIGEST, INPUT_FULL, INPUT_NONE)
# How many request ids a worker remembers to mark repeats: a retry comes within its call's deadline (seconds),
# so the last 100,000 answered calls cover it at any rate this process can serve; about 10 MB.
RECENT_REQUEST_IDS: Final = 100_000

Record = dict[str, object]


class RecentRequestIds:
    """The last `capacity` request ids seen, oldest forgotten first; thread-safe."""

    def __init__(self, capacity: int = RECENT_REQUEST_IDS) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, request_id: str) -> bool:
        """Whether `request_id` was seen before (among the remembered ones); remembers it either way. A call
        without an id (a caller of the data plane other than a transport) is never a repeat."""
        if not request_id:
            return False
        with self._lock:
            if request_id in self._ids:
                self._ids.move_to_end(request_id)
                return True
            self._ids[request_id] = None
            if len(self._ids) > self._capacity:
                self._ids.popitem(last=False)
            return False


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def _input_fields(matrix: FloatMatrix, inputs: str) -> list[dict[str, Any]]:
    """The per-row input fields (module docstring), one dict per row, to which the rest of the row is added."""
    if inputs == INPUT_DIGEST:
        wire = np.ascontiguousarray(matrix, dtype="<f8")
        # Each row of a C-contiguous array is hashed through the buffer protocol: no bytes copy per row (a fifth
        # of the digests' cost on 1,000-row calls).
        return [{"input_sha256": hashlib.sha256(row).hexdigest()} for row in wire]
    if inputs == INPUT_FULL:
        values = matrix.tolist()
        if np.isnan(matrix).any():
            values = [[_number(v) for v in row] for row in values]
        return [{"input": row} for row in values]
    return [{} for _ in range(matrix.shape[0])]


def _reasons(explained: RowExplanation) -> list[dict[str, object]]:
    return [{"feature": r.feature, "value": _number(r.value), "contribution": r.contribution, "code": r.code}
            for r in explained.reasons]


def caller_of(request: RequestContext) -> dict[str, str]:
    return {"identity": request.caller} if request.caller else {"peer": request.peer}


class RecordBuilder:
    """Builds the record of one answered call (module docstring); `inputs` is one of INPUT_MODES."""

    def __init__(self, inputs: str = INPUT_DIGEST, recent: RecentRequestIds | None = None) -> None:
        if inputs not in INPUT_MODES:
            raise ValueError(f"inputs must be one of {', '.join(INPUT_MODES)}, got {inputs!r}")
        self.inputs = inputs
        self._recent = recent or RecentRequestIds()

    def build(self, request: RequestContext, matrix: FloatMatrix, result: ScoreResult,
              explain: ExplainOptions | None, answered: float) -> Record:
        """The record of a call answered at `answered` (time.time()); called in submission order, so `repeat`
        marks the later of two calls with one id."""
        model = result.model
        rows = _input_fields(matrix, self.inputs)
        for row, score, decision in zip(rows, result.scores.tolist(), result.decisions.tolist(), strict=True):
            row["score"] = score
            row["decision"] = decision
        record: Record = {
            "time": datetime.fromtimestamp(answered, UTC).isoformat(timespec="microseconds"),
            "request_id": request.request_id,
            "repeat": self._recent.seen(request.request_id),
            "caller": caller_of(request),
            "model": model.name,
            "version": model.version,
            "model_digest": model.digest,
            "flavor": model.flavor,
            "backend": model.predictor.backend(len(rows)),
            "threshold": model.threshold,
            "threshold_source": model.threshold_source,
            "positive_label": model.labels.positive,
            "negative_label": model.labels.negative,
            "inputs": self.inputs,
        }
        explanations = result.explanations
        if explain is not None and explanations is not None:
            record["explain"] = {"top_k": explain.top_k, "all_rows": explain.all_rows,
                                 "expected_value": explanations.expected_value}
            for explained in explanations.rows:
                rows[explained.row]["reasons"] = _reasons(explained)
        record["rows"] = rows
        return record


class DecisionRecorder:
    """The data plane's record hook (core/dataplane.py): builds each answered call's record and submits it.

    In required mode the log raises DecisionLogUnavailable when a record cannot be written; the call then fails
    with DecisionNotRecorded (UNAVAILABLE, saying why) instead of giving a decision that has no record.
    """

    def __init__(self, log: DecisionLog, builder: RecordBuilder) -> None:
        self.log = log
        self.builder = builder

    def __call__(self, request: RequestContext, matrix: FloatMatrix, result: ScoreResult,
                 explain: ExplainOptions | None) -> None:
        try:
            self.log.submit(partial(self.builder.build, request, matrix, result, explain, time.time()))
        except DecisionLogUnavailable as exc:
            raise DecisionNotRecorded(f"the decision log is required and unavailable: {exc}; retry later") from exc


def decision_records(root: Path) -> Iterator[tuple[str, Record]]:
    """Every decision record under `root` (a decision_log_dir, or one worker's set) as (file:line, record), each
    set in its order; ValueError on a line that is not JSON (verify says more)."""
    sets = [root] if numbered_files(root) else sorted(p for p in root.iterdir() if p.is_dir() and numbered_files(p))
    for directory in sets:
        for _, path in numbered_files(directory):
            with path.open("rb") as lines:
                for number, line in enumerate(lines, start=1):
                    record = json.loads(line)
                    if record.get("kind") == "decision":
                        yield f"{path}:{number}", record
