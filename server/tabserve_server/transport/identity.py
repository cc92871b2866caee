"""Who is calling: the client certificate's subject alternative name (mutual TLS), and the allow-list.

The caller's identity is the first SAN of its certificate, as gRPC reports it (a DNS name, a URI such as a
SPIFFE ID, an IP address); '' without mutual TLS. The transport builds a `RequestContext` per call from it and
hands it to the data plane. With an allow-list, an identity not on it is refused with PERMISSION_DENIED naming
it (the handshake has already refused certificates from other CAs).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from tabserve_server.core.dataplane import RequestContext
from tabserve_server.errors import PermissionDenied
from tabserve_server.transport.request_id import call_request_id

_SAN = "x509_subject_alternative_name"


def caller_identity(context: grpc.ServicerContext) -> str:
    """The first SAN of the caller's certificate; '' when the connection is not mutual TLS."""
    names = context.auth_context().get(_SAN)
    return names[0].decode(errors="replace") if names else ""


def request_context(context: grpc.ServicerContext) -> RequestContext:
    """Who is calling and the call's request id (set by the Edge), for the data plane."""
    return RequestContext(caller=caller_identity(context), peer=context.peer(), request_id=call_request_id())


class CallerPolicy:
    """The allow-list of caller identities; `check` returns the identity a call is allowed under."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(allowed)

    def check(self, caller: str) -> str:
        """`caller` (its identity, from `caller_identity`) when it is allowed; PermissionDenied naming it otherwise."""
        if caller in self.allowed:
            return caller
        who = f"{caller!r}" if caller else "without a certificate identity (no SAN)"
        raise PermissionDenied(f"caller {who} is not in allowed_callers")
