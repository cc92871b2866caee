"""Log lines of both processes on stderr: text for people, or one JSON object per line for machines (`log_format`).

A JSON line holds `time` (RFC 3339, UTC, microseconds), `level`, `logger`, `process` (`server`, `supervisor`,
`worker-<i>` or `monitor`), `pid`, `thread` and `message`; `exception` (the traceback as text) when the record
carries one; and `request_id` on every line logged while the server serves a call (a filter the server adds sets
`record.request_id`, see tabserve_server/logs.py). A text line ends with ` [request <id>]` instead.

In JSON mode everything else that would write its own text lines to stderr goes through the same handler: MLflow
(which otherwise installs a handler of its own on import), Python warnings and uncaught exceptions.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from tabserve_common.settings import setting

__all__ = ["LOG_FORMATS", "JsonLineFormatter", "TextFormatter", "configure_logging", "log_format_setting"]

LOG_FORMATS = ("TEXT", "JSON")


def log_format_setting() -> Any:
    """The `log_format` field of both processes' settings."""
    return setting(
        "text", "Log lines on stderr: text, or json (one object per line: time, level, logger, process, pid, thread, "
        "message, exception, and request_id on the lines of a scoring call).", choices=LOG_FORMATS,
    )


def _rfc3339(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record (module docstring); ASCII only, so no stream encoding can break a line."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": _rfc3339(record.created), "level": record.levelname, "logger": record.name,
            "process": self._process, "pid": record.process, "thread": record.threadName,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL>[ <process>] <logger>: <message>[ [request <id>]]`, the traceback (if any) on the lines after."""

    def __init__(self, process: str = "") -> None:
        who = f" {process}" if process else ""
        super().__init__(f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", "")
        return f"{line} [request {request_id}]" if request_id else line


def configure_logging(
    level: str, log_format: str, process: str, *, shared_stream: bool = False, filters: Sequence[logging.Filter] = ()
) -> None:
    """Log to stderr at `level` in `log_format` (text or json, any case) as `process`.

    `shared_stream`: several processes write to one stream (the supervisor and its workers), so text lines name
    the process too (JSON lines always do). `filters` run on every record before it is formatted.
    """
    handler = logging.StreamHandler(sys.stderr)
    if log_format.lower() == "json":
        handler.setFormatter(JsonLineFormatter(process))
        _everything_through_logging(logging.getLevelName(level.upper()))
    else:
        handler.setFormatter(TextFormatter(process if shared_stream else ""))
    for each in filters:
        handler.addFilter(each)
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _everything_through_logging(level: int) -> None:
    """Send what would bypass the handler (text lines in a JSON stream) through logging instead."""
    # MLflow installs its own stderr handler on its loggers when imported (lazily, after this), unless told not to;
    # its records then reach the root handler like any other. Like tabserve_common.mlflow_client, MLflow's setting
    # is an environment variable, read at its import. Its set-up also quiets the SQL libraries below WARNING (an
    # SQL registry logs every migration step at INFO): kept here, so both formats carry the same lines.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name in ("sqlalchemy.engine", "alembic", "huey"):
        logging.getLogger(name).setLevel(max(logging.WARNING, level))
    logging.captureWarnings(True)
    crashes = logging.getLogger("uncaught")

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        crashes.critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or isinstance(args.exc_value, SystemExit):
            return
        crashes.error("uncaught %s in thread %s", args.exc_type.__name__, getattr(args.thread, "name", "?"),
                      exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
