"""What the decision log records (decisions/record.py) and how it is wired, against real servers and the real
registry: one record per answered call over 20,000 calls to two workers (rows too), retries of one logical call
sharing a request id and marked, required mode answering UNAVAILABLE, a SIGTERM with calls in flight leaving no
queued record unwritten, and `tabserve-admin decisions replay` bit-identical (and loud about an edited score)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tabserve.inference.v2 import open_inference_grpc_pb2 as pb
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc as pb_grpc
from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_client import RetryPolicy, ScoringClient
from tabserve_client.retry import call_with_retries
from tabserve_demo.applicants import make_applicants
from tabserve_server.app import ServingApp
from tabserve_server.decisions.record import Record, decision_records
from tests.support import Server, running_app, server_settings, wait_for

ROWS = make_applicants(64, seed=11)[0]
CALLS = 20_000
CHANNELS = 12  # separate connections, so SO_REUSEPORT spreads them over both workers
DEPTH = 4  # calls in flight per connection: 48 in all, within what two workers admit


def _records(directory: Path) -> list[Record]:
    return [record for _, record in decision_records(directory)]


def _score_request(rows: np.ndarray) -> Any:
    return scoring_pb2.ScoreRequest(matrix=scoring_pb2.MatrixRows(float64_le=rows.astype("<f8").tobytes(),
                                                                  num_rows=rows.shape[0]))


def _infer_request(rows: np.ndarray) -> Any:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP64", shape=list(rows.shape))
    return pb.ModelInferRequest(model_name="credit-default", inputs=[tensor],
                                raw_input_contents=[rows.astype("<f8").tobytes()])


@dataclass
class Tally:
    """Answers seen by the callers: OK calls and their rows, and the other status codes."""

    ok: int = 0
    rows: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, future: Any, rows: int) -> None:
        code = future.code()
        with self.lock:
            if code == grpc.StatusCode.OK:
                self.ok += 1
                self.rows += rows
            else:
                self.failed[code.name] = self.failed.get(code.name, 0) + 1


def _call(channel: grpc.Channel, i: int) -> tuple[Any, int]:
    """Call `i` of a run: mostly Score of 1-3 rows, every 7th through V2, every 50th malformed (not answered)."""
    rows = ROWS[i % 61: i % 61 + 1 + i % 3]
    if i % 50 == 0:
        bad = scoring_pb2.ScoreRequest(dense=scoring_pb2.DenseRows(rows=[scoring_pb2.DenseRow(values=[1.0])]))
        return scoring_pb2_grpc.ScoringStub(channel).Score.future(bad, timeout=30), 1
    if i % 7 == 0:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(_infer_request(rows), timeout=30), len(rows)
    return scoring_pb2_grpc.ScoringStub(channel).Score.future(_score_request(rows), timeout=30), len(rows)


def _drive(target: str, calls: int, tally: Tally, stop: threading.Event | None = None,
           make_call: Callable[[grpc.Channel, int], tuple[Any, int]] = _call) -> None:
    """`calls` calls over CHANNELS connections, DEPTH in flight on each; ends early when `stop` is set."""

    def one_connection(index: int) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(target, options=options) as channel:
            pending: list[tuple[Any, int]] = []
            for i in range(index, calls, CHANNELS):
                if stop is not None and stop.is_set():
                    break
                pending.append(make_call(channel, i))
                if len(pending) >= DEPTH:
                    future, rows = pending.pop(0)
                    future.exception()  # waits
                    tally.add(future, rows)
            for future, rows in pending:
                future.exception()
                tally.add(future, rows)

    threads = [threading.Thread(target=one_connection, args=(i,)) for i in range(CHANNELS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)


def _admin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tabserve_admin", "decisions", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_every_answered_call_of_two_workers_has_one_record_with_its_rows(tracking_uri: str, tmp_path: Path) -> None:
    settings = server_settings(tracking_uri, tmp_path / "cache", workers=2, decision_log_dir=str(tmp_path / "log"))
    tally = Tally()
    server = Server(settings)
    try:
        server.settle_on("1")
        started = time.monotonic()
        _drive(server.target, CALLS, tally)
        seconds = time.monotonic() - started
    finally:
        assert server.close() == 0
    records = _records(tmp_path / "log")
    print(f"{CALLS} calls in {seconds:.1f} s; {len(records)} records")
    # Refusals for load (UNAVAILABLE) are not answered decisions either: they may occur on a busy machine.
    assert set(tally.failed) <= {"INVALID_ARGUMENT", "UNAVAILABLE"} and tally.failed["INVALID_ARGUMENT"] > 0
    assert tally.ok + sum(tally.failed.values()) == CALLS and tally.ok > CALLS * 0.9
    assert len(records) == tally.ok
    assert sum(len(r["rows"]) for r in records) == tally.rows  # type: ignore[arg-type]
    assert len({r["request_id"] for r in records}) == len(records) and not any(r["repeat"] for r in records)
    assert {r["worker"] for r in records} == {"worker-0", "worker-1"}
    assert _admin("verify", str(tmp_path / "log")).returncode == 0


@pytest.fixture(scope="module")
def full_app(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServingApp, Path]]:
    """An in-process server logging full inputs."""
    root = tmp_path_factory.mktemp("full")
    settings = server_settings(tracking_uri, root / "cache", decision_log_dir=str(root / "log"),
                               decision_log_inputs="full")
    with running_app(settings) as app:
        yield app, root / "log"


def _wait_records(directory: Path, where: Callable[[Record], bool], count: int) -> list[Record]:
    """The records matching `where`, once there are `count` of them (the writer thread is asynchronous)."""
    return wait_for(lambda: (found := [r for r in _records(directory) if where(r)]) and len(found) >= count
                    and found, timeout=10, what=f"{count} decision records")  # type: ignore[no-any-return]


class LostAnswer(grpc.RpcError):
    """What a client sees when the server answered but the answer never arrived (a dropped connection)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def trailing_metadata(self) -> tuple[()]:
        return ()


def test_retries_of_one_logical_call_share_a_request_id_and_are_marked(
    full_app: tuple[ServingApp, Path]
) -> None:
    app, log = full_app
    attempts: list[str] = []

    def lose_the_first_answer(request: Any, timeout: float, metadata: Any) -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{app.public_port}") as channel:
            answer = scoring_pb2_grpc.ScoringStub(channel).Score(request, timeout=timeout, metadata=metadata)
        attempts.append(dict(metadata)["x-request-id"])
        if len(attempts) == 1:
            raise LostAnswer()
        return answer

    call_with_retries(lose_the_first_answer, _score_request(ROWS[:2]), 10.0, RetryPolicy(initial_seconds=0.01),
                      request_id="retried-call-1")
    records = _wait_records(log, lambda r: r["request_id"] == "retried-call-1", 2)
    assert attempts == ["retried-call-1"] * 2
    assert [r["repeat"] for r in records] == [False, True]
    assert records[0]["rows"] == records[1]["rows"]


def test_replay_is_bit_identical_and_reports_an_edited_score(
    full_app: tuple[ServingApp, Path], tracking_uri: str, tmp_path: Path
) -> None:
    app, log = full_app
    with ScoringClient(f"127.0.0.1:{app.public_port}") as client:
        ids = [client.score(ROWS[:1]).request_id,  # the single-row fast path
               client.score(ROWS[1:40]).request_id,  # a batch
               client.score(ROWS[:10], explain=True, explain_all_rows=True).request_id]  # with reasons
        with_nan = ROWS[40:42].copy()
        with_nan[:, 3] = np.nan
        ids.append(client.score(with_nan).request_id)
    records = _wait_records(log, lambda r: r["request_id"] in ids, len(ids))
    assert {r["backend"] for r in records} == {"lightgbm-single-row", "lightgbm-batch"}
    assert any("reasons" in row for r in records for row in r["rows"])  # type: ignore[attr-defined]
    done = _admin("replay", str(log), "--tracking-uri", tracking_uri)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every score and reason identical" in done.stdout

    edited = tmp_path / "edited"
    edited.mkdir()
    lines = []
    for _, record in decision_records(log):
        if record["request_id"] == ids[1]:
            rows: list[dict[str, Any]] = record["rows"]  # type: ignore[assignment]
            rows[5]["score"] = float(np.nextafter(rows[5]["score"], 1.0))  # one bit
        lines.append(json.dumps(record))
    (edited / "decisions-00000001.jsonl").write_text("\n".join(lines) + "\n")
    done = _admin("replay", str(edited), "--tracking-uri", tracking_uri)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "DIFFERS" in done.stdout and "row 5: score logged" in done.stdout


def test_required_mode_answers_unavailable_when_the_log_cannot_be_written(tracking_uri: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    settings = server_settings(tracking_uri, tmp_path / "cache", decision_log_dir=str(tmp_path / "a-file" / "log"),
                               decision_log_required=True)
    with running_app(settings) as app, grpc.insecure_channel(f"127.0.0.1:{app.public_port}") as channel:
        calls = (lambda: scoring_pb2_grpc.ScoringStub(channel).Score(_score_request(ROWS[:1]), timeout=20),
                 lambda: pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_infer_request(ROWS[:2]), timeout=20))
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "decision log is required and unavailable" in (caught.value.details() or "")
            assert "cannot be opened" in (caught.value.details() or "")


def _big_call(channel: grpc.Channel, i: int) -> tuple[Any, int]:
    """50 rows: with full inputs a record takes the writer longer than the call takes the server."""
    return scoring_pb2_grpc.ScoringStub(channel).Score.future(_score_request(ROWS[:50]), timeout=30), 50


def test_a_sigterm_with_calls_in_flight_leaves_no_queued_record_unwritten(tracking_uri: str, tmp_path: Path) -> None:
    settings = server_settings(tracking_uri, tmp_path / "cache", decision_log_dir=str(tmp_path / "log"),
                               decision_log_inputs="full", shutdown_grace_seconds=10.0)
    server = Server(settings)
    tally, stop = Tally(), threading.Event()
    driver = threading.Thread(target=_drive, args=(server.target, 100_000, tally, stop, _big_call))
    try:
        server.settle_on("1")
        driver.start()
        wait_for(lambda: (server.metric("tabserve_server_decision_log_queue_depth") or 0) >= 20, timeout=60,
                 what="records queued for the writer")
        assert server.close() == 0  # SIGTERM, calls still arriving
    finally:
        stop.set()
        driver.join(timeout=120)
    records = _records(tmp_path / "log")
    assert tally.ok > 20 and len(records) == tally.ok
    verified = _admin("verify", str(tmp_path / "log"))
    assert verified.returncode == 0, verified.stdout + verified.stderr
