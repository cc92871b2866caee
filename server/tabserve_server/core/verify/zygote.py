"""The serving process's side of the verifier zygote (fork_server.py): start it, ask it for a verification, and
restart it when it is gone.

`Zygote.run()` returns how the forked child ended (process.py's `Ended`, judged exactly as a spawned
verifier's end), or None when the zygote itself could not do it (dead, stopped, broken pipe, not ready in
time): the caller then verifies in a process of its own (the spawn path) and restarts the zygote, so a dead
zygote never fails a load.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tabserve_server.core.verify import lifeline
from tabserve_server.core.verify.process import VERIFIER_ENV, Ended

log = logging.getLogger(__name__)

# After its child was killed on the time limit, how long the zygote may take to say so before it is killed too.
REPORT_SECONDS = 5.0
# How often a wait for the zygote checks that it still runs.
LIVENESS_SECONDS = 0.25


class ZygoteGone(Exception):
    """The zygote did not answer as its protocol says: dead, stopped or confused."""


class Zygote:
    """One fork server per serving process, started on `start()` (or the first `run()`), one request at a time."""

    def __init__(self, *, lean: bool) -> None:
        self._lean = lean
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._buffer = b""
        # The kernel sends the parent-death signal when the *thread* that started the zygote ends, not its process:
        # so it is always started by this one long-lived thread, never by a loader thread that ends after its load.
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifier-zygote")

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None or process.poll() is not None else process.pid

    def start(self) -> None:
        """Start the zygote unless it runs: it imports in the background; returns at once."""
        with self._lock:
            self._ensure()

    def run(self, args: list[str], nice: int, timeout: float) -> Ended | None:
        """Fork a verifier child for `args` (__main__.py's), give it `timeout` seconds; None: the zygote failed."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._ensure()
            try:
                if not self._ready:
                    self._read(deadline, "ready")
                    self._ready = True
                self._write({"argv": args, "nice": nice})
                # The fork is the zygote's to answer at once, even to a time limit shorter than that.
                child = int(self._read(deadline + REPORT_SECONDS, "pid")["pid"])
                try:
                    ended = self._read(deadline, "code")
                except TimeoutError:
                    _kill(child)
                    self._read(time.monotonic() + REPORT_SECONDS, "code")
                    return Ended(-signal.SIGKILL, "", timed_out=True)
                return Ended(int(ended["code"]), str(ended.get("output", "")))
            except (ZygoteGone, TimeoutError, OSError, ValueError, KeyError) as exc:
                log.warning("the verifier zygote failed (%s): verifying in a process of its own", exc or type(exc))
                self._stop()
                return None

    def close(self) -> None:
        with self._lock:
            self._stop()
        self._starter.shutdown(wait=False)

    def _ensure(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self._stop()
        self._process = self._starter.submit(self._popen).result()
        self._ready, self._buffer = False, b""

    def _popen(self) -> subprocess.Popen[bytes]:
        command = [*lifeline.spawn_prefix(), sys.executable, "-m", "tabserve_server.core.verify.fork_server",
                   "--parent-pid", str(os.getpid())]
        return subprocess.Popen(
            [*command, "--lean"] if self._lean else command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, **VERIFIER_ENV}, start_new_session=True,
        )

    def _stop(self) -> None:
        """Kill the zygote (its process group: anything it started before it put a child in a group of its own);
        reap it. Its child dies with it: by its parent-death signal once armed, else as fork_server's `_own_group`
        says."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        process.wait()

    def _write(self, message: dict[str, Any]) -> None:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write((json.dumps(message) + "\n").encode())
        self._process.stdin.flush()

    def _read(self, deadline: float, key: str) -> dict[str, Any]:
        """The zygote's next message, which must hold `key`; TimeoutError past `deadline`."""
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {key!r} from the zygote in time")
            if not select.select([fd], [], [], min(left, LIVENESS_SECONDS))[0]:
                if self._process.poll() is not None:  # a child stopped before it armed may hold the pipe open
                    raise ZygoteGone("it exited")
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise ZygoteGone("it exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict) or key not in message:
            raise ZygoteGone(f"expected {key!r}, got {line[:200]!r}")
        return message


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass  # ended meanwhile: the zygote reports it as usual
