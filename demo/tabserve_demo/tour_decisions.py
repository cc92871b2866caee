"""The `make demo` tour's look at the decision log: the record of the declined applicant's call, and
`tabserve-admin decisions verify` on the whole log once the server has stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tabserve_demo.tour_output import TourError, detail, wait_until
from tabserve_server.decisions.record import decision_records

RECORD_TIMEOUT_S = 20.0  # the log's writer thread is asynchronous (default mode)
VERIFY_TIMEOUT_S = 120.0
# The log's own fields first, then the record's, in the order a reader wants them.
_SHOWN_FIRST = ("worker", "seq", "time", "request_id", "repeat", "caller", "model", "version", "model_digest",
                "backend", "threshold", "threshold_source", "inputs", "explain")


def _find(log_dir: Path, request_id: str) -> tuple[str, dict[str, Any]] | None:
    if not log_dir.is_dir():
        return None
    try:
        for where, record in decision_records(log_dir):
            if record["request_id"] == request_id:
                return where, record
    except ValueError:
        pass  # a line being written: read again
    return None


def show_decision_record(log_dir: Path, request_id: str, row: int) -> None:
    """Print the decision log line of call `request_id`, with only row `row` of its rows (the declined one)."""
    where, record = wait_until(lambda: _find(log_dir, request_id), RECORD_TIMEOUT_S,
                               f"the decision record of request {request_id}")
    rows: list[dict[str, Any]] = record["rows"]
    shown = {key: record[key] for key in _SHOWN_FIRST if key in record}
    shown[f"rows[{row}] of {len(rows)} (applicant #{row + 1})"] = rows[row]
    shown["prev"], shown["hash"] = record["prev"], record["hash"]
    detail(f"its decision log line ({Path(where).relative_to(log_dir.parent)}), other rows left out:")
    for key, value in shown.items():
        detail(f"  {key}: {json.dumps(value)}")
    if rows[row]["decision"] is not True or "reasons" not in rows[row]:
        raise TourError(f"the record of request {request_id} does not hold row {row}'s adverse decision and reasons")


def verify_decision_log(log_dir: Path) -> str:
    """Run `tabserve-admin decisions verify` on the log and print its report; its last line when intact."""
    done = subprocess.run([sys.executable, "-m", "tabserve_admin", "decisions", "verify", str(log_dir)],
                          capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S, check=False)
    detail(f"$ tabserve-admin decisions verify {log_dir}")
    for line in (done.stdout + done.stderr).splitlines():
        detail(f"  {line}")
    if done.returncode != 0:
        raise TourError(f"tabserve-admin decisions verify exited {done.returncode}")
    return done.stdout.strip().splitlines()[-1]


__all__ = ["show_decision_record", "verify_decision_log"]
