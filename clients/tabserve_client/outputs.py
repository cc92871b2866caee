"""`tabserve-client score` output: one CSV row or JSON-lines record per input row, in input order, with the
version that scored it (and its reason columns with `--explain`)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from typing import IO, Any, Final

from tabserve_client import explain_output
from tabserve_client.client import ModelInfo, Reason, ScoreBatch
from tabserve_client.explain_output import Explain
from tabserve_client.inputs import ParsedInput

# `decision` is score >= threshold; `label` says what that means for the version (e.g. decline / approve).
OUTPUT_FIELDS: Final = ("score", "decision", "label", "threshold", "model_name", "model_version")


def _rows(
    parsed: ParsedInput, results: Sequence[ScoreBatch], infos: dict[tuple[str, str], ModelInfo]
) -> Iterator[tuple[Any, float, bool, str, ScoreBatch, tuple[Reason, ...]]]:
    index = 0
    for batch in results:
        info = infos[(batch.model_name, batch.model_version)]
        for i, (score, decision) in enumerate(zip(batch.scores.tolist(), batch.decisions.tolist(), strict=True)):
            row_id = parsed.ids[index] if parsed.has_ids else None
            yield row_id, float(score), bool(decision), info.label(bool(decision)), batch, batch.reasons.get(i, ())
            index += 1


def write_scores(
    out: IO[str],
    fmt: str,
    id_column: str,
    parsed: ParsedInput,
    results: Sequence[ScoreBatch],
    *,
    infos: dict[tuple[str, str], ModelInfo],
    explain: Explain | None = None,
) -> None:
    if fmt == "jsonl":
        for row_id, score, decision, label, batch, reasons in _rows(parsed, results, infos):
            record: dict[str, Any] = {id_column: row_id} if parsed.has_ids else {}
            record.update(
                score=score,
                decision=decision,
                label=label,
                threshold=batch.threshold,
                model_name=batch.model_name,
                model_version=batch.model_version,
            )
            if explain is not None:
                record.update(explain_output.reason_record(reasons, batch.expected_value))
            out.write(json.dumps(record) + "\n")
        return
    writer = csv.writer(out, lineterminator="\n")
    reason_header = explain_output.reason_columns(explain.top_k) if explain is not None else []
    writer.writerow([*([id_column] if parsed.has_ids else []), *OUTPUT_FIELDS, *reason_header])
    for row_id, score, decision, label, batch, reasons in _rows(parsed, results, infos):
        cells = [
            repr(score),
            "true" if decision else "false",
            label,
            repr(batch.threshold),
            batch.model_name,
            batch.model_version,
        ]
        if explain is not None:
            cells += explain_output.reason_cells(reasons, batch.expected_value, explain.top_k)
        if parsed.has_ids:
            cells.insert(0, row_id if isinstance(row_id, str) else json.dumps(row_id))
        writer.writerow(cells)
