"""Single-row throughput with the decision log on (digest inputs, the default) against off, in the same run
(issue 15's figure pair).

Two project servers run side by side, one with `decision_log_dir` set and one with it empty; the same generator
as the mutual-TLS section (raw stubs, 16 caller threads on one channel per server) loads them in alternating
blocks, so drift on a shared machine hits both alike. With the log on, each answered call builds its record on
the call's path (decisions/record.py) and the writer thread encodes, hashes and writes it in batches, competing
for the same cores. The record count is checked against the calls made, so a fast figure cannot hide dropped
records.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.mtls import single_row_pair
from bench.report import RAW_STUB, SectionResult, Target, ratio
from bench.serving import CALLERS
from tabserve_demo.processes import ServerProcess
from tabserve_server.decisions.record import decision_records
from tests.support import scrape

LOG_ON = "decision log on (digest)"
LOG_OFF = "decision log off"
TARGET = "single-row throughput, decision log on (digest inputs) vs off"
DROPPED = "tabserve_server_decision_records_dropped_total"


def run(
    workdir: Path, rows: np.ndarray, *, quick: bool, start_server: Callable[..., ServerProcess],
    wait_serving: Callable[..., None],
) -> dict[str, Any]:
    log_dir = workdir / "decision-log-on"
    servers: dict[str, ServerProcess] = {}
    try:
        servers[LOG_OFF] = start_server("log-off", decision_log_dir="")
        servers[LOG_ON] = start_server("log-on", decision_log_dir=str(log_dir), decision_log_inputs="digest")
        for process in servers.values():
            wait_serving(process.target)
        rates, failed, samples = single_row_pair({name: (p.target, None) for name, p in servers.items()}, rows,
                                                 quick)
        metrics = scrape(servers[LOG_ON].metrics_port)
        dropped = {k: v for k, v in metrics.items() if v and k.startswith(DROPPED)}
    finally:
        for process in servers.values():
            process.stop()  # SIGTERM: the log is flushed and closed
    records = sum(1 for _ in decision_records(log_dir))
    expected = samples + 1  # the connecting call before the clock starts
    result = SectionResult()
    for name, rate in rates.items():
        result.add(f"single row, {CALLERS} callers: throughput", name, RAW_STUB, rate, "calls/s", samples=samples)
    result.targets.append(Target(
        TARGET, ratio(rates[LOG_ON], rates[LOG_OFF]), 0.9, False,
        f"log on / log off, raw stubs, {CALLERS} callers on one channel each, alternating blocks",
        extra_ok=not any(failed.values()) and records == expected - failed[LOG_ON],
        detail=f"failed calls: {failed}; records written {records} of {expected - failed[LOG_ON]} answered calls; "
               f"dropped before the stop: {dropped or 'none'}",
    ))
    return result.as_dict()
