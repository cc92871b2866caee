"""Overload: admission control of the public port (transport/admission.py) under a flood, and its policy by table.

The flood runs against a real server process on loopback with a small pool (4 threads, 8 waiting), so a few
thousand concurrent single-row calls over several connections overload it within seconds on any machine.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest

from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_client import ScoringClient
from tabserve_server.transport.admission import CORE_OPTIONS, Admission, AdmissionExecutor, Limits
from tabserve_server.transport.edge import PUSHBACK_KEY, Edge
from tests.support import SCORE_METHOD, Server, running_app, server_settings, settled_server, wait_for

CONNECTIONS = 6
# At this size gRPC core's own pending-request limits shed calls as CANCELLED (measured: 2,526 of 10,000 without
# admission.CORE_OPTIONS); the flood takes 5-10 s on 2 shared cores.
CALLS = 10000
FEATURES = 189


@pytest.fixture(scope="module")
def server(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Streams per connection well above the bounds: the calls reach admission control, which is under test here
    # (test_overload_streams.py tests the default stream limit, which holds them on the client's side).
    settings = server_settings(tracking_uri, tmp_path_factory.mktemp("overload") / "cache", max_workers=4,
                               max_waiting=8, max_queue_seconds=0.1, max_concurrent_streams=1000)
    with settled_server(settings) as running:
        yield running


def flood(target: str, calls: int, timeout: float = 60.0) -> list[tuple[grpc.StatusCode, str, dict[str, str]]]:
    """`calls` concurrent single-row Score calls over CONNECTIONS channels: (code, details, trailers) of each."""
    request = scoring_pb2.ScoreRequest()
    request.matrix.float64_le = np.full((1, FEATURES), np.nan).tobytes()
    request.matrix.num_rows = 1
    channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CONNECTIONS)]
    try:
        stubs = [scoring_pb2_grpc.ScoringStub(c) for c in channels]
        pending = [stubs[i % CONNECTIONS].Score.future(request, timeout=timeout) for i in range(calls)]
        results = []
        for future in pending:
            exc = future.exception(timeout=timeout + 10)
            call: Any = exc if exc is not None else future
            trailers = {k: v for k, v in (call.trailing_metadata() or ())}
            code = grpc.StatusCode.OK if exc is None else call.code()
            results.append((code, "" if exc is None else call.details(), trailers))
        return results
    finally:
        for channel in channels:
            channel.close()


def test_flood_ends_every_call_ok_or_overloaded_and_every_refusal_is_counted(server: Server) -> None:
    before = server.metrics()
    results = flood(server.target, CALLS)
    after = server.metrics()
    codes = Counter(code for code, _, _ in results)
    refused = [(details, trailers) for code, details, trailers in results if code == grpc.StatusCode.UNAVAILABLE]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert codes[grpc.StatusCode.OK] > 0 and refused, codes  # it was overloaded, and still served
    assert all("overloaded" in details for details, _ in refused), refused[:3]
    assert all(int(trailers[PUSHBACK_KEY]) > 0 for _, trailers in refused), refused[:3]

    def delta(name: str, **labels: str) -> float:
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        return after.get(key, 0.0) - before.get(key, 0.0)

    counted = sum(delta("tabserve_server_requests_refused_total", reason=r)
                  for r in ("queue_full", "queue_time", "deadline", "caller_share"))
    assert counted == len(refused)
    method = SCORE_METHOD
    assert delta("tabserve_server_requests_total", method=method, code="OK") == codes[grpc.StatusCode.OK]
    assert delta("tabserve_server_requests_total", method=method, code="UNAVAILABLE") == len(refused)


def test_get_status_reports_the_bounds_of_the_process(server: Server) -> None:
    limits = server.status().admission
    assert (limits.max_in_flight, limits.max_waiting, limits.max_queue_seconds, limits.caller_share) == (4, 8, 0.1, 1.0)
    assert limits.max_concurrent_streams == 1000


def test_what_lives_as_long_as_the_process_is_out_of_full_collections(
    tracking_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A full collection walked the imports and the first model (about 400,000 objects) with every thread stopped,
    210-245 ms several times a minute under a flood; frozen at the first model load (app.py), they are skipped
    until the first model is swapped out (its cycles, if any, must stay collectable)."""
    def collect_seconds() -> float:
        started = time.perf_counter()
        gc.collect()
        return time.perf_counter() - started

    gc.unfreeze()
    settings = server_settings(tracking_uri, tmp_path_factory.mktemp("frozen") / "cache")
    with running_app(settings) as app:
        frozen, quick = gc.get_freeze_count(), collect_seconds()
        model = app.manager.current()
        assert model is not None
        app._on_swap(model, model)  # what a reload calls: the first model is no longer the served one
        assert gc.get_freeze_count() == 0
    gc.unfreeze()  # the same objects walked again, as before the freeze
    slow = collect_seconds()
    assert frozen > 100_000, frozen
    assert quick * 5 < slow, (quick, slow)


BURST = 5000
BURST_THREADS = 120


def test_a_burst_through_the_client_library_completes_every_call_ok(server: Server) -> None:
    """5,000 calls from 120 threads over 6 clients against 12 places (4 running, 8 waiting): refused by the
    thousand, every one ends OK through the library's retries with pushback."""
    before = server.metric("tabserve_server_requests_refused_total", reason="queue_full") or 0.0
    row = np.full(FEATURES, np.nan)
    clients = [ScoringClient(server.target, timeout=60) for _ in range(CONNECTIONS)]
    try:
        with futures.ThreadPoolExecutor(BURST_THREADS) as pool:
            done = list(pool.map(lambda i: clients[i % CONNECTIONS].score(row).model_version, range(BURST)))
    finally:
        for client in clients:
            client.close()
    assert done == ["1"] * BURST
    assert (server.metric("tabserve_server_requests_refused_total", reason="queue_full") or 0.0) - before > BURST / 10


def test_a_call_whose_deadline_is_shorter_than_a_call_takes_is_refused_unstarted() -> None:
    admission = Admission(Limits(4, 8, 1.0), queued=lambda: 0, waited=lambda: 0.0)
    admission.service_seconds = 0.05
    refusal = admission.start("", remaining=0.01)
    assert refusal is not None and refusal.reason == "deadline"
    assert admission.start("", remaining=0.5) is None


@pytest.mark.parametrize(("queued", "waited", "reason"), [
    (8, 0.0, "queue_full"), (7, 0.0, None), (0, 1.5, "queue_time"), (0, 0.5, None),
])
def test_queue_bounds(queued: int, waited: float, reason: str | None) -> None:
    admission = Admission(Limits(4, 8, 1.0), queued=lambda: queued, waited=lambda: waited)
    refusal = admission.arrive() or admission.start("", remaining=None)
    assert (refusal.reason if refusal else None) == reason
    if refusal:
        assert "overloaded" in refusal.message and refusal.pushback_ms >= 10


def test_no_caller_holds_more_than_its_share_of_the_in_flight_budget() -> None:
    admission = Admission(Limits(4, 8, 1.0, caller_share=0.5), queued=lambda: 0, waited=lambda: 0.0)
    assert admission.start("noisy", None) is None and admission.start("noisy", None) is None
    refusal = admission.start("noisy", None)
    assert refusal is not None and refusal.reason == "caller_share" and "'noisy'" in refusal.message
    assert admission.start("quiet", None) is None  # the other caller still gets its share
    admission.finish("noisy", 0.001)
    assert admission.start("noisy", None) is None


def test_concurrent_callers_are_counted_exactly() -> None:
    admission = Admission(Limits(64, 8, 1.0, caller_share=1.0), queued=lambda: 0, waited=lambda: 0.0)

    def cycle() -> None:
        for _ in range(200):
            assert admission.start("a", None) is None
            admission.finish("a", 0.001)

    threads = [threading.Thread(target=cycle) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admission.start("a", None) is None  # nothing leaked




class Blocking(scoring_pb2_grpc.ScoringServicer):
    """Every Score call holds its worker thread until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Score(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.release.wait(30)
        return scoring_pb2.ScoreResponse(model_version="1", scores=[0.5], decisions=[True])


def test_a_refusal_on_arrival_never_waits_for_a_worker_thread() -> None:
    """One thread, held; one call waiting: the next call is refused at once (gRPC's polling thread answers it),
    not after the held call ends, as it would if the refusal needed a worker thread."""
    pool = AdmissionExecutor(1)
    admission = Admission(Limits(1, 1, 30.0), pool.queued_now, pool.waited)
    server = grpc.server(pool, interceptors=[Edge(None, admission=admission)], options=CORE_OPTIONS)
    servicer = Blocking()
    scoring_pb2_grpc.add_ScoringServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            score = scoring_pb2_grpc.ScoringStub(channel).Score
            held = score.future(scoring_pb2.ScoreRequest(), timeout=30)
            wait_for(lambda: pool.running == 1, timeout=10, what="the held call running")
            waiting = score.future(scoring_pb2.ScoreRequest(), timeout=30)
            wait_for(lambda: pool.queued == 1, timeout=10, what="the second call waiting")
            with pytest.raises(grpc.RpcError) as refused:
                score(scoring_pb2.ScoreRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            assert "overloaded" in str(refused.value.details())
            trailers = dict(refused.value.trailing_metadata() or ())
            assert trailers[PUSHBACK_KEY] and trailers["x-request-id"]  # refusals carry a request id too
            assert not held.done()
            servicer.release.set()
            assert held.result(timeout=10).model_version == waiting.result(timeout=10).model_version == "1"
    finally:
        servicer.release.set()
        server.stop(0)
