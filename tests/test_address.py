"""`host:port` text as both processes read it (tabserve_common.address)."""

from __future__ import annotations

import pytest

from tabserve_common.address import is_loopback, join_address, split_address


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("localhost:0", ("localhost", 0)),
        (":9100", ("0.0.0.0", 9100)),
        ("[::1]:65535", ("::1", 65535)),
        ("[::]:50051", ("::", 50051)),
    ],
)
def test_split_and_join(address: str, parts: tuple[str, int]) -> None:
    assert split_address(address) == parts
    if not address.startswith(":"):
        assert join_address(*parts) == address


@pytest.mark.parametrize("address", ["", "localhost", "host:", "host:http", "host:-1", "host:65536", "[::1]"])
def test_not_an_address(address: str) -> None:
    with pytest.raises(ValueError, match=r"not host:port with a port in 0\.\.65535"):
        split_address(address)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost", True), ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("0.0.0.0", False),
     ("10.0.0.1", False), ("::", False), ("server.internal", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
