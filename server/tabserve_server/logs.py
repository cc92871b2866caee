"""Logging of the server process: the request id of the call a log line was written for, in every line.

The Edge sets `CALL_REQUEST_ID` for the duration of each public call (transport/request_id.py); every line
logged while it is set carries it (`request_id` in a JSON line, ` [request <id>]` at the end of a text line; the
formats are tabserve_common/logs.py's), so an operator can find one call's lines (and its decision record) from the
id the caller was given.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

from tabserve_common.logs import configure_logging as configure_process_logging
from tabserve_server.settings import ServerSettings

# The request id of the public call the current thread is serving ('' outside a call).
CALL_REQUEST_ID: ContextVar[str] = ContextVar("tabserve_call_request_id", default="")


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` to the id of the call being served ('' outside a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = CALL_REQUEST_ID.get()
        return True


def configure_logging(settings: ServerSettings, process: str) -> None:
    """Log to stderr as `settings` say, as `process` (server, supervisor, worker-<i>); text lines name the process
    when several share the stream (the supervisor and its workers)."""
    configure_process_logging(settings.log_level, settings.log_format, process, shared_stream=settings.workers != 1,
                              filters=[RequestIdFilter()])
