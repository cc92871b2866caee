"""A monitor poll costs the same with 500 registered versions as with 1, proved without timing.

Two registries from bench/monitor_poll.py: 1 version, and 500 versions over many runs with a large artifact
in the model directory they all point at. Two counts that machine noise cannot move:
- in-process SQLite: the SQL statements and ORM rows MLflow's store handles per poll (the same store code
  runs behind `mlflow server`, so this also bounds the server side);
- through a real `mlflow server`: a recording HTTP proxy in front of it lists the REST endpoints one poll
  hits and the bytes they return; none lists versions, runs or artifacts (stage mode's change check searches
  versions for one row: `max_results=1`).
The stage audit (listing versions) runs on the first poll and then only when due, and is checked as such.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bench.monitor_poll import MODEL_NAME, build_registry, mlflow_server, store_work
from tabserve_monitor.registry import RegistryWatcher

VERSIONS = 500
SIZES = (1, VERSIONS)


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[str, Path]]:
    root = tmp_path_factory.mktemp("poll-cost")
    return {
        1: (build_registry(root / "1", versions=1, runs=1, large_bytes=0), root / "1"),
        VERSIONS: (build_registry(root / "500", versions=VERSIONS, runs=50, large_bytes=8 << 20), root / "500"),
    }


def test_store_work_per_poll_does_not_grow(registries: dict[int, tuple[str, Path]]) -> None:
    work = {size: store_work(uri) for size, (uri, _) in registries.items()}
    print(work)
    for mode in ("alias", "stage"):
        small, large = work[1][mode], work[VERSIONS][mode]
        assert large["statements"] == small["statements"], (mode, small, large)
        # Rows: the registered model, its aliases, and at most one latest version per stage (4 stages).
        assert large["rows"] <= small["rows"] + 3 and large["rows"] <= 10, (mode, small, large)
    # What stage mode did before, for contrast: MLflow's get_registered_model loads every version.
    assert work[VERSIONS]["stage, before (get_registered_model)"]["rows"] >= VERSIONS


class _Recording(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.calls: list[tuple[str, str, int]] = []  # method, path (with a search's max_results), response bytes
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def take(self) -> list[tuple[str, str, int]]:
        with self.lock:
            calls, self.calls = self.calls, []
        return calls


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Recording

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection", "content-length"}}
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if path.endswith("/search"):
            path += f"?max_results={urllib.parse.parse_qs(url.query).get('max_results', ['?'])[0]}"
        with self.server.lock:
            self.server.calls.append((self.command, path, len(data)))
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in {"transfer-encoding", "connection", "content-length"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def proxies(registries: dict[int, tuple[str, Path]]) -> Iterator[dict[int, _Recording]]:
    servers = {size: mlflow_server(uri, root) for size, (uri, root) in registries.items()}
    recorders: dict[int, _Recording] = {}
    threads = []
    try:
        for server in servers.values():
            server.wait_healthy()
        for size, server in servers.items():
            recorders[size] = _Recording(server.url)
            thread = threading.Thread(target=recorders[size].serve_forever, daemon=True)
            thread.start()
            threads.append(thread)
        yield recorders
    finally:
        for recorder in recorders.values():
            recorder.shutdown()
            recorder.server_close()
        for thread in threads:
            thread.join(5)
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.stop()


FORBIDDEN = ("model-versions/search?max_results=1000", "registered-models/list", "runs", "experiments", "artifacts",
             "logged-models", "get-download-uri")


@pytest.mark.mlflow_server
@pytest.mark.parametrize("mode", ["alias", "stage"])
def test_rest_calls_per_poll_are_a_constant_set(proxies: dict[int, _Recording], mode: str) -> None:
    per_poll: dict[int, list[list[tuple[str, str, int]]]] = {}
    audits: dict[int, list[tuple[str, str, int]]] = {}
    for size, recorder in proxies.items():
        watcher = RegistryWatcher(recorder.url, MODEL_NAME, alias="production",
                                  stage="Production" if mode == "stage" else "", audit_interval_seconds=3600)
        first = watcher.resolve()
        audits[size] = recorder.take()
        assert first.target is not None and first.target.version == str(size)
        assert first.audited == (mode == "stage")
        polls = []
        for _ in range(3):
            resolution = watcher.resolve()
            assert resolution.target is not None and resolution.target.version == str(size)
            assert not resolution.audited and not resolution.ambiguous
            polls.append(recorder.take())
        per_poll[size] = polls

    endpoints = {size: {[(m, p) for m, p, _ in poll] == [(m, p) for m, p, _ in polls[0]] for poll in polls}
                 for size, polls in per_poll.items()}
    assert endpoints == {1: {True}, VERSIONS: {True}}, per_poll  # every poll hits the same calls
    small = [(m, p) for m, p, _ in per_poll[1][0]]
    large = [(m, p) for m, p, _ in per_poll[VERSIONS][0]]
    print(mode, small, [b for _, _, b in per_poll[1][0]], [b for _, _, b in per_poll[VERSIONS][0]])
    # Alias: the alias lookup. Stage: the change check (the most recently updated version, the chosen one).
    assert small == large and len(small) == (1 if mode == "alias" else 2), (small, large)
    assert not any(word in path for _, path in small for word in FORBIDDEN), small
    # Bounded answers: no list of versions comes back (500 versions would be far above this).
    assert all(size < 8_000 for polls in per_poll.values() for poll in polls for _, _, size in poll)
    # The stage audit lists versions, on the first poll only (then when due or after a change).
    if mode == "stage":
        assert all(any("model-versions/search" in path for _, path, _ in calls) for calls in audits.values()), audits
