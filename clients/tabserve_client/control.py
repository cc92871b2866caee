"""Typed client of tabserve.control.v1.ModelControl (the monitor's API), and the one builder of AspiredVersion.

Everything that talks to a control port (the monitor, the multi-worker supervisor, the demo tour, the bench,
the tests) goes through `ControlClient`; nothing else constructs the generated stub.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import grpc

from tabserve.control.v1 import control_pb2, control_pb2_grpc
from tabserve_client.channel import ChannelClient, TlsOptions, open_channel

# models:/NAME/VERSION, models:/NAME/STAGE or models:/NAME@ALIAS (the server's grammar, core/loading.py).
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))$")

# A control client talks to a local peer that restarts (a server rollout, a worker restart): reconnect within
# 2 s instead of gRPC's default reconnect back-off, which grows to 120 s.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def aspired_version(model_uri: str, name: str = "", version: str = "") -> control_pb2.AspiredVersion:
    """The `AspiredVersion` message that states `model_uri` as the version to serve.

    Args:
        model_uri: what to load; pinned (``models:/NAME/VERSION``) when the caller resolved it, as the monitor
            does. Any URI the server accepts is passed through unchanged.
        name: the registered model name; derived from a ``models:/`` URI when empty.
        version: the concrete version; derived from ``models:/NAME/VERSION`` (digits only) when empty, and
            left empty for aliases, stages and non-registry URIs.
    """
    match = _MODELS_URI.match(model_uri)
    if match is not None:
        name = name or match["name"]
        ref = match["ref"] or ""
        version = version or (ref if ref.isdigit() else "")
    return control_pb2.AspiredVersion(model_name=name, version=version, model_uri=model_uri)


class ControlError(Exception):
    """The one exception type `ControlClient` raises for a failed call.

    Attributes:
        code: the gRPC status code: UNAVAILABLE when the server is not reachable, UNAUTHENTICATED /
            PERMISSION_DENIED for a missing or wrong token, INVALID_ARGUMENT for a statement without a URI,
            FAILED_PRECONDITION for CommitStaged on a supervisor (it commits by itself), DEADLINE_EXCEEDED.
        details: the server's message.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class ControlClient(ChannelClient):
    """Client of one control port (a single server or the supervisor of a multi-worker server).

    The contract of the API it calls: a statement (`set_aspired`) is idempotent and the latest one wins; the
    server loads in the background, validates and swaps, so a statement returns at once and `status()` tells
    how the load goes. Use as a context manager (or call ``close()``)::

        with ControlClient("127.0.0.1:50052") as control:
            control.set_aspired(aspired_version("models:/credit-default/3"))
            print(control.status().serving.version)

    Every method returns the generated response message (``control_pb2.*Response``, see
    protos/tabserve/control/v1/control.proto for the fields) and raises `ControlError` on failure.

    A control port bound anywhere but loopback speaks TLS and requires the token::

        tls = TlsOptions(ca_file="/etc/tabserve/ca.crt", server_name="tabserve.example")
        with ControlClient("10.0.0.5:50052", token=token_from_a_file, tls=tls) as control:
            ...

    Args:
        address: ``host:port`` of the control port.
        token: the bearer token the server requires (``control_token``); empty sends no credentials.
        timeout: default deadline of each call, in seconds.
        channel: an existing channel to use instead of creating one (not closed by ``close()``).
        tls: speak TLS to the control port (the server's CA, a server name override); None: plaintext, as on
            loopback. Ignored when ``channel`` is given.
    """

    def __init__(
        self, address: str = "127.0.0.1:50052", *, token: str = "", timeout: float = 5.0,
        channel: grpc.Channel | None = None, tls: TlsOptions | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata: Sequence[tuple[str, str]] = (("authorization", f"Bearer {token}"),) if token else ()
        super().__init__(channel or open_channel(address, RECONNECT_OPTIONS, tls), own=channel is None)
        self._stub = control_pb2_grpc.ModelControlStub(self._channel)  # type: ignore[no-untyped-call]

    def status(self, *, timeout: float | None = None) -> control_pb2.GetStatusResponse:
        """What the server serves, what it aspires to, how the last load went (GetStatus).

        On a multi-worker server the answer aggregates the workers and lists each one in ``workers``.
        """
        response: control_pb2.GetStatusResponse = self._call(
            self._stub.GetStatus, control_pb2.GetStatusRequest(), timeout
        )
        return response

    def set_aspired(
        self, aspired: control_pb2.AspiredVersion, stage_only: bool = False, *, timeout: float | None = None
    ) -> control_pb2.SetAspiredVersionResponse:
        """State the version to serve (SetAspiredVersion); build `aspired` with `aspired_version()`.

        The response says whether it is served already (``already_serving``) and carries the status. With
        `stage_only` a worker process loads and validates the version, then holds it staged until
        `commit_staged` (the supervisor's two-phase rollout); a single server swaps it in by itself.
        """
        request = control_pb2.SetAspiredVersionRequest(aspired=aspired, stage_only=stage_only)
        response: control_pb2.SetAspiredVersionResponse = self._call(self._stub.SetAspiredVersion, request, timeout)
        return response

    def commit_staged(
        self, aspired: control_pb2.AspiredVersion, *, timeout: float | None = None
    ) -> control_pb2.CommitStagedResponse:
        """Swap in the version staged for `aspired` (CommitStaged); ``serving`` is true once it is served.

        Idempotent: true again when the version is served already; false when nothing matching is staged.
        """
        request = control_pb2.CommitStagedRequest(aspired=aspired)
        response: control_pb2.CommitStagedResponse = self._call(self._stub.CommitStaged, request, timeout)
        return response

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise ControlError(code, details or "") from None
