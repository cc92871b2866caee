"""The request id of a public call: the caller's `x-request-id` metadata, else a new one; returned to the caller
in the response's initial metadata and set for the server's log lines of the call (logs.py).

A caller's id is kept when it is 1..128 printable ASCII characters without spaces (anything else would let a
caller write control characters into log lines and records); otherwise, and when there is none, the server
makes one (uuid4, hex), and the caller learns it from the response's initial metadata.
"""

from __future__ import annotations

import re
import uuid
from contextvars import Token

import grpc

from tabserve_server.logs import CALL_REQUEST_ID

REQUEST_ID_KEY = "x-request-id"
_ACCEPTED = re.compile(r"[!-~]{1,128}")


def request_id_of(context: grpc.ServicerContext) -> str:
    """The call's request id: the caller's when acceptable (module docstring), else a new one."""
    for key, value in context.invocation_metadata():
        if key == REQUEST_ID_KEY:
            if isinstance(value, str) and _ACCEPTED.fullmatch(value):
                return value
            break
    return uuid.uuid4().hex


def begin_call(context: grpc.ServicerContext) -> Token[str]:
    """Give the call its request id: sent in the initial metadata, set for log lines until `end_call`."""
    request_id = request_id_of(context)
    try:
        context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
    except grpc.RpcError:
        pass  # the caller is gone (cancelled, deadline passed): the Edge still answers and counts the call
    return CALL_REQUEST_ID.set(request_id)


def end_call(token: Token[str]) -> None:
    CALL_REQUEST_ID.reset(token)


def call_request_id() -> str:
    """The request id of the call the current thread serves ('' outside one)."""
    return CALL_REQUEST_ID.get()
