"""The Open Inference Protocol (V2) section: the project's V2 front against the fast-path V2 reference servicer.

The load generator is what an MLServer user points at a V2 server: async grpcio (`grpc.aio`), 16 concurrent
callers on one channel, one FP64 tensor named `input-0` in `raw_input_contents` (requests prebuilt, so the
generator spends its CPU on calls, not on encoding). The reference is bench/reference_server.py's
`ReferenceInference` (LightGBM's single-row fast path, nothing else); the project runs in its production
configuration (`PRODUCTION` below: metrics, validation, health, admission control at its defaults, the
decision log on with digest inputs; TLS off), recorded in the section's `configuration`.
Both run at once and are measured in alternating rounds, so drift on a shared machine hits both alike:
sequential single-row p50, single-row calls/s with 16 callers, 1,000-row rows/s with 16 callers, then h2load
(bench/h2load.py) sending the same single-row V2 request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import h2load
from bench.report import H2LOAD, V2_ASYNC, SectionResult, Target, percentile_ms, ratio
from tabserve.inference.v2 import open_inference_grpc_pb2 as pb
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc as pb_grpc
from tabserve_demo.processes import ChildProcess
from tabserve_server.decisions.record import decision_records

log = logging.getLogger(__name__)

V2_METHOD = "inference.GRPCInferenceService/ModelInfer"
TENSOR_NAME = "input-0"  # what MLServer's clients send
CALLERS = 16
BATCH_ROWS = 1000
SERVERS = ("reference", "project")


def production(workdir: Path) -> dict[str, Any]:
    """The project's settings for this section beyond start_project_server's (which turns metrics on)."""
    return {
        "decision_log_dir": str(workdir / "v2-decisions"),
        "decision_log_inputs": "digest",
        "health_address": "127.0.0.1:0",
    }


def infer_request(model_name: str, rows: np.ndarray) -> Any:
    request = pb.ModelInferRequest(model_name=model_name)
    request.inputs.add(name=TENSOR_NAME, datatype="FP64", shape=list(rows.shape))
    request.raw_input_contents.append(np.ascontiguousarray(rows, dtype="<f8").tobytes())
    return request


@dataclass
class Calls:
    """What one server answered over the rounds of one kind of load."""

    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    failed: dict[str, int] = field(default_factory=dict)  # by gRPC status code

    @property
    def per_second(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else float("nan")


async def drive(stub: Any, requests: Sequence[Any], seconds: float, callers: int, calls: Calls) -> None:
    """`callers` coroutines calling back to back for `seconds`; adds to `calls`."""
    deadline = time.perf_counter() + seconds

    async def caller(index: int) -> None:
        i = index
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await stub.ModelInfer(requests[i % len(requests)], timeout=30.0)
            except grpc.aio.AioRpcError as exc:
                calls.failed[exc.code().name] = calls.failed.get(exc.code().name, 0) + 1
                log.warning("V2 call failed: %s %s", exc.code().name, exc.details())
            else:
                calls.latencies.append(time.perf_counter() - started)
            i += callers

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    calls.seconds += time.perf_counter() - started


@dataclass
class Durations:
    rounds: int
    sequential: float  # seconds per round and server
    single: float
    batch: float
    h2load_seconds: int
    h2load_rounds: int


QUICK = Durations(rounds=1, sequential=0.5, single=0.5, batch=0.5, h2load_seconds=1, h2load_rounds=1)
FULL = Durations(rounds=3, sequential=3.0, single=5.0, batch=4.0, h2load_seconds=10, h2load_rounds=2)


async def measure(targets: dict[str, str], model_name: str, rows: np.ndarray, durations: Durations
                  ) -> dict[str, dict[str, Calls]]:
    """Per server: sequential single rows, 16-caller single rows, 16-caller 1,000-row batches."""
    singles = [infer_request(model_name, rows[i : i + 1]) for i in range(min(len(rows), 256))]
    batches = [infer_request(model_name, rows[i : i + BATCH_ROWS]) for i in range(0, len(rows) - BATCH_ROWS + 1,
                                                                                  BATCH_ROWS)]
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    channels = {name: grpc.aio.insecure_channel(target, options=options) for name, target in targets.items()}
    kinds: dict[str, tuple[Sequence[Any], Callable[[Durations], float], int]] = {
        "sequential": (singles, lambda d: d.sequential, 1),
        "single": (singles, lambda d: d.single, CALLERS),
        "batch": (batches, lambda d: d.batch, CALLERS),
    }
    results = {name: {kind: Calls() for kind in kinds} for name in targets}
    try:
        stubs = {name: pb_grpc.GRPCInferenceServiceStub(channel) for name, channel in channels.items()}
        for stub in stubs.values():  # warm-up: connections, first predictions, metric children
            await drive(stub, singles, 0.5, CALLERS, Calls())
            await drive(stub, batches, 0.5, 2, Calls())
        for _ in range(durations.rounds):
            for kind, (requests, seconds, callers) in kinds.items():
                for name, stub in stubs.items():
                    await drive(stub, requests, seconds(durations), callers, results[name][kind])
    finally:
        for channel in channels.values():
            await channel.close()
    return results


def _python_figures(result: SectionResult, measured: dict[str, dict[str, Calls]]) -> dict[str, dict[str, float]]:
    values: dict[str, dict[str, float]] = {}
    for name, kinds in measured.items():
        seq, single, batch = kinds["sequential"], kinds["single"], kinds["batch"]
        values[name] = {
            "p50": result.add("V2 single row, sequential: p50", name, V2_ASYNC, percentile_ms(seq.latencies, 50),
                              "ms", samples=len(seq.latencies)),
            "calls": result.add(f"V2 single row, {CALLERS} callers: throughput", name, V2_ASYNC, single.per_second,
                                "calls/s", samples=len(single.latencies)),
            "rows": result.add(f"V2 {BATCH_ROWS}-row batch, {CALLERS} callers", name, V2_ASYNC,
                               batch.per_second * BATCH_ROWS, "rows/s", samples=len(batch.latencies)),
        }
        result.add(f"V2 single row, {CALLERS} callers: p50", name, V2_ASYNC, percentile_ms(single.latencies, 50),
                   "ms", samples=len(single.latencies))
        for kind, calls in kinds.items():
            if calls.failed:
                result.notes.append(f"{name}, {kind}: failed V2 calls by code {calls.failed} (Python generator)")
    return values


def run(
    binary: str, workdir: Path, rows: np.ndarray, *, model_name: str, reference: ChildProcess, quick: bool,
    start_server: Callable[..., ChildProcess], wait_serving: Callable[[str], None],
) -> dict[str, Any]:
    result = SectionResult()
    durations = QUICK if quick else FULL
    settings = production(workdir)
    server = start_server(name="v2", **settings)
    try:
        ports = {"reference": int(reference.ports["public_port"]), "project": int(server.ports["public_port"])}
        wait_serving(f"127.0.0.1:{ports['project']}")
        measured = asyncio.run(measure({n: f"127.0.0.1:{p}" for n, p in ports.items()}, model_name, rows,
                                       durations))
        metrics_port = int(server.ports["metrics_port"])
        servers: h2load.Servers = {
            "reference": (ports["reference"], lambda: h2load.reference_ok_count(reference)),
            "project": (ports["project"], lambda: h2load.project_ok_count(metrics_port, V2_METHOD)),
        }
        body = h2load.write_body(workdir / "v2-1row.grpc", rows[:1], infer_request(model_name, rows[:1]))
        runs = h2load.alternate(binary, workdir, body, servers, seconds=durations.h2load_seconds,
                                rounds=durations.h2load_rounds, tag="v2", method=V2_METHOD)
        answered = h2load.project_ok_count(metrics_port, V2_METHOD)
    finally:
        server.stop()
    values = _python_figures(result, measured)
    label = f"V2 single row, {h2load.CONNECTIONS} connections"
    rates = {name: h2load.add_runs(result, name, label, name_runs) for name, name_runs in runs.items()}
    _targets(result, values, rates, failed=sum(r.failed for r in runs["project"]))
    section = result.as_dict()
    section["configuration"] = {**settings, "tls": False, "metrics": True, "admission control": "defaults",
                                "generator": f"grpc.aio, {CALLERS} callers, one channel, FP64 {TENSOR_NAME!r}"}
    records = sum(1 for _ in decision_records(Path(settings["decision_log_dir"])))
    section["notes"].append(f"decision log (digest inputs): {records} records for {answered} V2 calls answered OK")
    return section


def _targets(result: SectionResult, values: dict[str, dict[str, float]], rates: dict[str, float], failed: int
             ) -> None:
    project, reference = values["project"], values["reference"]
    basis = "project V2 front (production configuration) / fast-path V2 reference, alternating rounds"
    result.targets.append(Target("V2 single-row throughput vs fast path (Python V2)",
                                 ratio(project["calls"], reference["calls"]), 0.9, False, basis))
    result.targets.append(Target(
        "V2 single-row throughput vs fast path (h2load)", ratio(rates["project"], rates["reference"]), 0.9, False,
        f"{basis}, verified OK calls/s, {H2LOAD} {h2load.CONNECTIONS} connections x 1 stream",
        extra_ok=failed == 0, detail=f"{failed} failed calls" if failed else "",
    ))
    result.targets.append(Target("V2 single-row p50 vs fast path (Python V2)",
                                 ratio(project["p50"], reference["p50"]), 1.1, True, f"{basis}, sequential calls"))
    result.notes.append(
        f"V2 {BATCH_ROWS}-row rows/s, project / reference: "
        f"{ratio(project['rows'], reference['rows']) or float('nan'):.2f}x (Python V2 generator)"
    )
