"""Logging of the server process: one format, and the request id of the call a log line was written for.

The Edge sets `CALL_REQUEST_ID` for the duration of each public call (transport/request_id.py); every line
logged while it is set ends with ` [request <id>]`, so an operator can find one call's lines (and its
decision record) from the id the caller was given.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

# The request id of the public call the current thread is serving ('' outside a call).
CALL_REQUEST_ID: ContextVar[str] = ContextVar("tabserve_call_request_id", default="")


class RequestIdFilter(logging.Filter):
    """Sets `record.request` to ' [request <id>]' inside a call, '' outside (the format ends with it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = CALL_REQUEST_ID.get()
        record.request = f" [request {request_id}]" if request_id else ""
        return True


def configure_logging(level: str, process: str = "") -> None:
    """Log to stderr at `level`; `process` names the worker in every line ('' for a single process)."""
    who = f" {process}" if process else ""
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s%(request)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
