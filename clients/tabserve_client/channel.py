"""The base of the clients: one gRPC channel, closed with the client when the client opened it."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import grpc


class ChannelClient:
    """A client over `channel`; use as a context manager (or call ``close()``). A channel passed in by the
    caller (`own` false) stays open: its owner closes it."""

    def __init__(self, channel: grpc.Channel, *, own: bool) -> None:
        self._channel = channel
        self._own_channel = own

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()
