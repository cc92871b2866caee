"""Overload (issue 12): ten times the peak single-row load for 10 s from h2load, and what the server makes of it.

On one project server of its own (production configuration), in order:

1. peak: h2load, 16 connections x 1 stream, timed (as the h2load section): verified OK calls/s, the peak P;
2. unloaded: the probe (`PROBES` Python callers, raw stubs, sequential single rows) alone: its p99;
3. flood: h2load sends 10 x P x `seconds` requests at 10 x P calls/s (`--rps` over `FLOOD_CONNECTIONS`
   connections) while the probe keeps calling. Each connection has at most as many streams open as the server
   allows (its `max_concurrent_streams`, at most `FLOOD_STREAMS`), as a gRPC client that learnt the limit in
   the handshake would: h2load holds the other requests on its side and sends one when a stream closes, so it
   sends no faster than its open streams are answered. The section reports the rate asked (offered) and the
   rate sent, plainly different;
4. RSS of the server before the flood and `SETTLE_SECONDS` after it.

h2load cannot read gRPC status codes, so the accounting is the server's own: its
`tabserve_server_requests_total` for Score by code, and `tabserve_server_requests_refused_total`. Every call
sent (h2load's and the probe's) must be answered OK or counted as refused; anything else (gRPC core's
`CANCELLED`, a reset stream, an error) is an unaccounted call. Admitted latency is the probe's: its OK calls
during the flood, end to end (queueing in gRPC core and in the server's pool included), against the same probe
unloaded. Goodput is every OK call the server answered during the flood, per second of the flood.

`python -m bench.overload [--seconds N]` runs this section alone (the bench model, its registry).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.h2load import CONNECTIONS, ensure_h2load, h2load, project_ok_count, run_h2load, write_body
from bench.processes import SCORE_METHOD, score_calls_by_code
from bench.reload_memory import rss_bytes
from bench.report import H2LOAD, RAW_STUB, SectionResult, Target, percentile_ms, ratio
from bench.serving import score_request
from tabserve.scoring.v1 import scoring_pb2_grpc
from tabserve_demo.processes import ChildProcess

log = logging.getLogger(__name__)

OFFERED = 10  # x the peak
FLOOD_CONNECTIONS = 40
FLOOD_STREAMS = 100  # per connection: enough to keep the rate while refusals and admitted calls are answered
PROBES = 4  # sequential callers: admitted calls are few during a flood, four give a p99 more samples
PROBE_TIMEOUT = 10.0
SETTLE_SECONDS = 2.0
GOODPUT_TARGET = 0.9
LATENCY_TARGET = 3.0
MEMORY_TARGET = 1.1


@dataclass
class Probe:
    """`callers` sequential Python callers, a channel each: latency of each OK call, and every status seen."""

    target: str
    row: np.ndarray
    callers: int = 1
    ok_seconds: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run_for(self, seconds: float) -> None:
        self.start()
        time.sleep(seconds)
        self.stop()

    def start(self) -> None:
        self._stop.clear()
        self.ok_seconds, self.codes = [], Counter()
        self._threads = [threading.Thread(target=self._loop, name="probe", daemon=True) for _ in range(self.callers)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(PROBE_TIMEOUT + 5)

    def _loop(self) -> None:
        request = score_request(self.row.reshape(1, -1))
        with grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = scoring_pb2_grpc.ScoringStub(channel)
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    stub.Score(request, timeout=PROBE_TIMEOUT)
                except grpc.RpcError as exc:
                    with self._lock:
                        self.codes[exc.code().name] += 1
                    self._stop.wait(0.005)  # a refused probe comes back soon, not in a tight loop
                    continue
                with self._lock:
                    self.ok_seconds.append(time.perf_counter() - started)
                    self.codes["OK"] += 1


@dataclass(frozen=True)
class Flood:
    sent: int  # requests h2load completed (every one got an HTTP response)
    http_errors: int  # h2load's failed + errored + timed out
    seconds: float


@dataclass(frozen=True)
class Answers:
    """Score calls the server answered, by gRPC status code, and its refusals (all reasons)."""

    codes: Counter[str]
    refused: float

    @classmethod
    def read(cls, metrics_port: int) -> Answers:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        refused = sum(sample.value for family in text_string_to_metric_families(text)
                      if family.name == "tabserve_server_requests_refused" for sample in family.samples
                      if sample.name.endswith("_total"))
        return cls(Counter(score_calls_by_code(metrics_port)), refused)

    def since(self, before: Answers) -> Answers:
        codes = Counter(self.codes)
        codes.subtract(before.codes)
        return Answers(+codes, self.refused - before.refused)


def server_stream_limit(max_concurrent_streams: int | None) -> int:
    """The server's stream limit per connection with `max_concurrent_streams` (None: the setting's default)."""
    from tabserve_server.settings import ServerSettings

    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ServerSettings)}
    chosen = defaults["max_concurrent_streams"] if max_concurrent_streams is None else max_concurrent_streams
    return int(chosen or defaults["max_workers"])


def flood(binary: str, port: int, body: Path, *, rate: float, seconds: float, streams: int) -> Flood:
    """`rate` x `seconds` requests at `rate` calls/s (h2load --rps, spread over the connections), at most
    `streams` open per connection."""
    requests = max(FLOOD_CONNECTIONS, int(rate * seconds))
    per_connection = max(1, math.ceil(rate / FLOOD_CONNECTIONS))
    url = f"http://127.0.0.1:{port}/{SCORE_METHOD}"
    args = [
        binary, "-n", str(requests), "-c", str(FLOOD_CONNECTIONS), "-m", str(streams), "-t", "1",
        "--rps", str(per_connection), "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
        url,
    ]
    seconds_taken, counts = run_h2load(args)
    return Flood(sent=counts["done"], http_errors=counts["failed"] + counts["errored"] + counts["timeout"],
                 seconds=seconds_taken)


def run(
    binary: str, workdir: Path, rows: np.ndarray, *, quick: bool, start_server: Callable[..., ChildProcess],
    wait_serving: Callable[[str], None], seconds: float | None = None, max_concurrent_streams: int | None = None,
    overrides: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`max_concurrent_streams`: the server's setting (None: its default); `overrides`: other server settings."""
    result = SectionResult()
    seconds = seconds or (1.0 if quick else 10.0)
    limit = server_stream_limit(max_concurrent_streams)
    streams = min(FLOOD_STREAMS, limit)
    body = write_body(workdir / "score-1row-overload.grpc", rows[:1])
    settings = dict(overrides or {})
    if max_concurrent_streams is not None:
        settings["max_concurrent_streams"] = str(max_concurrent_streams)
    server = start_server(name="overload", **settings)
    try:
        port, metrics_port = int(server.ports["public_port"]), int(server.ports["metrics_port"])
        wait_serving(f"127.0.0.1:{port}")
        count = lambda: project_ok_count(metrics_port)  # noqa: E731
        h2load(binary, port, body, requests=200, log_file=workdir / "h2load-overload-warmup.log", ok_count=count)
        peak_run = h2load(binary, port, body, seconds=max(1, round(seconds / 2)),
                          log_file=workdir / "h2load-overload-peak.log", ok_count=count)
        peak = result.add(f"peak: verified OK throughput, {CONNECTIONS} connections x 1 stream", "project",
                          H2LOAD, peak_run.ok_per_second, "calls/s", samples=peak_run.requests)
        probe = Probe(f"127.0.0.1:{port}", rows[1], PROBES)
        probe.run_for(seconds / 2)
        unloaded_p99 = percentile_ms(probe.ok_seconds, 99)
        result.add("unloaded: probe p50", "project", RAW_STUB, percentile_ms(probe.ok_seconds, 50), "ms",
                   samples=len(probe.ok_seconds))
        result.add("unloaded: probe p99", "project", RAW_STUB, unloaded_p99, "ms", samples=len(probe.ok_seconds))
        rss_before = rss_bytes(server.pid)
        before = Answers.read(metrics_port)
        probe.start()
        try:
            flooded = flood(binary, port, body, rate=OFFERED * peak, seconds=seconds, streams=streams)
        finally:
            probe.stop()
        answers = Answers.read(metrics_port).since(before)
        time.sleep(SETTLE_SECONDS)
        rss_after = rss_bytes(server.pid)
    finally:
        server.stop()
    _report(result, peak=peak, unloaded_p99=unloaded_p99, flooded=flooded, answers=answers, probe=probe,
            rss=(rss_before, rss_after), streams=streams, limit=limit)
    return result.as_dict()


def _report(result: SectionResult, *, peak: float, unloaded_p99: float, flooded: Flood, answers: Answers,
            probe: Probe, rss: tuple[int, int], streams: int, limit: int) -> None:
    label = f"flood ({OFFERED} x peak, {FLOOD_CONNECTIONS} connections x {streams} streams)"
    # A gRPC client learns the server's stream limit in the handshake and queues calls beyond it on its side;
    # h2load is told the limit instead (it would send its first streams before the server's SETTINGS arrive).
    result.add(f"{label}: streams per connection the server allows", "project", H2LOAD, limit, "streams")
    sent = flooded.sent + sum(probe.codes.values())
    ok, refused = answers.codes.get("OK", 0), answers.refused
    unaccounted = sent - ok - refused
    other = {code: n for code, n in answers.codes.items() if code not in ("OK", "UNAVAILABLE")}
    goodput = ok / flooded.seconds if flooded.seconds else float("nan")
    result.add(f"{label}: offered, asked", "project", H2LOAD, OFFERED * peak, "calls/s")
    # h2load sends no faster than its open streams are answered: what it sent is the load the server saw.
    result.add(f"{label}: sent (h2load held the rest)", "project", H2LOAD, flooded.sent / flooded.seconds,
               "calls/s",
               samples=flooded.sent)
    result.add(f"{label}: goodput (OK calls/s)", "project", H2LOAD, goodput, "calls/s", samples=int(ok))
    result.add(f"{label}: refused (counted)", "project", H2LOAD, refused, "calls", samples=sent)
    result.add(f"{label}: unaccounted (sent - OK - refused)", "project", H2LOAD, unaccounted, "calls", samples=sent)
    result.add(f"{label}: h2load stream errors", "project", H2LOAD, flooded.http_errors, "calls", samples=sent)
    # Every call open at the server waits in one FIFO (gRPC core's queue, then the pool's) for the calls ahead of it
    # to be answered: a call arriving behind the flood's open streams waits about open / answered-per-second
    # (Little's law), whatever admission decides about them (docs/performance.md, "What the admitted p99 is made of").
    open_calls = FLOOD_CONNECTIONS * streams + PROBES
    answered = (ok + refused) / flooded.seconds if flooded.seconds else float("nan")
    result.add(f"{label}: calls open ahead of a new one / answered per second", "project", H2LOAD,
               open_calls / answered * 1000 if answered else float("nan"), "ms", samples=open_calls)
    flood_p99 = percentile_ms(probe.ok_seconds, 99)
    result.add(f"{label}: probe p50 (admitted)", "project", RAW_STUB, percentile_ms(probe.ok_seconds, 50), "ms",
               samples=len(probe.ok_seconds))
    result.add(f"{label}: probe p99 (admitted)", "project", RAW_STUB, flood_p99, "ms", samples=len(probe.ok_seconds))
    result.add(f"{label}: probe refused", "project", RAW_STUB, probe.codes.get("UNAVAILABLE", 0), "calls",
               samples=sum(probe.codes.values()))
    result.add("RSS before the flood", "project", H2LOAD, rss[0] / 2**20, "MiB")
    result.add(f"RSS {SETTLE_SECONDS:g} s after the flood", "project", H2LOAD, rss[1] / 2**20, "MiB")
    cancelled = answers.codes.get("CANCELLED", 0) + probe.codes.get("CANCELLED", 0)
    accounted = unaccounted == 0 and flooded.http_errors == 0 and not other and cancelled == 0
    detail = (f"sent {sent}, OK {ok:.0f}, refused {refused:.0f}, unaccounted {unaccounted:.0f}, "
              f"h2load errors {flooded.http_errors}, other codes {other or 'none'}, probe {dict(probe.codes)}")
    result.targets.append(Target(
        "overload goodput vs peak", ratio(goodput, peak), GOODPUT_TARGET, False,
        f"OK calls/s during {OFFERED} x peak offered / peak (h2load 16 x 1), and every call OK or counted refused",
        extra_ok=accounted, detail=detail,
    ))
    result.targets.append(Target(
        "overload admitted p99 vs unloaded", ratio(flood_p99, unloaded_p99), LATENCY_TARGET, True,
        f"probe p99 of OK calls during the flood / probe p99 alone ({PROBES} sequential raw-stub callers)",
    ))
    result.targets.append(Target(
        "overload memory after vs before", ratio(rss[1], rss[0]), MEMORY_TARGET, True,
        f"server RSS {SETTLE_SECONDS:g} s after the flood / before it; "
        f"{rss[0] / 2**20:.0f} -> {rss[1] / 2**20:.0f} MiB",
    ))


def main(argv: list[str] | None = None) -> int:
    from bench.model import FULL, TINY, bench_rows, ensure_model, registry_for
    from bench.processes import start_project_server, wait_serving
    from bench.report import format_figures, format_targets

    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model")
    parser.add_argument("--seconds", type=float, default=None, help="flood length (default 10; --quick 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the section's dict here")
    parser.add_argument("--max-concurrent-streams", type=int, default=None,
                        help="the server's max_concurrent_streams (default: the setting's default)")
    parser.add_argument("--server", action="append", default=[], metavar="NAME=VALUE",
                        help="another server setting for an A/B (repeatable), e.g. max_waiting=4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = ensure_model(TINY if args.quick else FULL)
    registry = registry_for(model)
    with tempfile.TemporaryDirectory(prefix="tabserve-overload-") as tmp:
        workdir = Path(tmp)

        def start_server(name: str, start_timeout: float = 120.0, **overrides: Any) -> ChildProcess:
            return start_project_server(registry.tracking_uri, f"models:/{registry.model_name}@production", workdir,
                                        name, start_timeout, **overrides)

        section = run(ensure_h2load(), workdir, bench_rows(1000), quick=args.quick, start_server=start_server,
                      wait_serving=wait_serving, seconds=args.seconds,
                      max_concurrent_streams=args.max_concurrent_streams,
                      overrides=dict(item.split("=", 1) for item in args.server))
    if args.json is not None:
        args.json.write_text(json.dumps(section, indent=2) + "\n")
    print(format_figures({"overload": section}))
    print()
    print(format_targets(section["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
