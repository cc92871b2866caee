"""The request id of a public call: the caller's `x-request-id` metadata, else a new one; returned to the caller
in the response's trailing metadata (every outcome: answered, failed, refused) and set for the server's log lines
of the call (logs.py).

Trailing, not initial: grpcio sends a unary call's initial metadata in the same batch as its status only while
the application sent none; sending the id there was one more batch, one more event on gRPC's polling thread (the
server's serial stage) per call: about 0.06 of single-row throughput (docs/performance.md, run 12).

A caller's id is kept when it is 1..128 printable ASCII characters without spaces (anything else would let a
caller write control characters into log lines and records); otherwise, and when there is none, the server
makes one: 32 hex digits, a random prefix drawn once per process (64 bits) and a counter (64 bits). That is
unique like a uuid4 across processes and calls, without a uuid4's `os.urandom` system call on every call (most
callers, h2load among them, send no id). The caller learns it from the response's trailing metadata.
"""

from __future__ import annotations

import itertools
import os
import re
from contextvars import Token

import grpc

from tabserve_server.logs import CALL_REQUEST_ID

REQUEST_ID_KEY = "x-request-id"
_ACCEPTED = re.compile(r"[!-~]{1,128}")


class _NewIds:
    """Request ids made by this process (module docstring); a forked child draws its own prefix."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)  # next() is one C call under the GIL: no two threads get one value

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


_NEW_IDS = _NewIds()


def request_id_of(context: grpc.ServicerContext) -> str:
    """The call's request id: the caller's when acceptable (module docstring), else a new one."""
    for key, value in context.invocation_metadata():
        if key == REQUEST_ID_KEY:
            if isinstance(value, str) and _ACCEPTED.fullmatch(value):
                return value
            break
    return new_request_id()


def new_request_id() -> str:
    """A new request id (module docstring): unique across calls and processes."""
    return _NEW_IDS.next()


def begin_call(context: grpc.ServicerContext) -> Token[str]:
    """Give the call its request id: in the trailing metadata (a later `set_trailing_metadata` of the call must
    carry it again), set for log lines until `end_call`."""
    request_id = request_id_of(context)
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    return CALL_REQUEST_ID.set(request_id)


def end_call(token: Token[str]) -> None:
    CALL_REQUEST_ID.reset(token)


def call_request_id() -> str:
    """The request id of the call the current thread serves ('' outside one)."""
    return CALL_REQUEST_ID.get()
