"""Child processes shared by the demo tour, the tests, the benchmark and the measurement tools.

- `free_port()`: a loopback port for programs that cannot bind port 0 and report it;
- `ChildProcess`: a child that announces itself with JSON lines on stdout (first `{"event": "listening", ...ports}`),
  read with a time limit; stderr goes to a file, never a pipe that could fill up;
- `ServerProcess` / `MonitorProcess`: `python -m tabserve_server` / `python -m tabserve_monitor` as such children,
  configured through their environment variables;
- `ServiceProcess`: a third-party service on a fixed loopback port, in a session of its own and stopped as a
  process group; `MlflowServer`, a real `mlflow server`, is one (the registry's stores are in stores.py).

Installed with the demo package (`tabserve_demo.processes`), so the installed tour and the repository's tests,
bench and tools use the one implementation.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tabserve_server.settings import ENV_PREFIX as SERVER_ENV_PREFIX
from tabserve_server.settings import ServerSettings

MONITOR_ENV_PREFIX = "TABSERVE_MONITOR_"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prefixed_env(prefix: str, values: Mapping[str, object], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment without `prefix`* variables, plus `values` as `prefix`+KEY (booleans lower case)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    for key, value in values.items():
        env[prefix + key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(extra or {})
    return env


class ChildProcess:
    """A child process whose stdout carries JSON event lines, the first one `{"event": "listening", ...}`.

    A thread reads stdout all along (so the child never blocks on a full pipe and every wait has a time limit);
    stderr goes to `log_file`, or to an anonymous temporary file when none is given. `close()` (and leaving a
    `with` block) kills the child if it still runs; `stop()` asks it to end with SIGTERM first.
    """

    def __init__(
        self, args: Sequence[str], *, env: Mapping[str, str] | None = None, log_file: Path | None = None,
        cwd: Path | None = None, start_timeout: float = 60.0, name: str = "child",
    ) -> None:
        self.name = name
        self.log_file = log_file
        self._log: IO[str] = log_file.open("w+") if log_file else tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=cwd,
            env=dict(env) if env is not None else None,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True)
        self._reader.start()
        try:
            self.ports: dict[str, Any] = self.read_event("listening", start_timeout)
        except BaseException:
            self.close()
            raise

    def _read_stdout(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        with stdout:
            for line in stdout:
                self._lines.put(line)
        self._lines.put("")  # end of file

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_event(self, event: str, timeout: float) -> dict[str, Any]:
        """The next stdout JSON line whose `event` is `event` (other lines are skipped), within `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"the {self.name} printed no {event!r} line within {timeout} s; log: ...{self.log_tail(1500)}"
                ) from None
            if not line:
                self._lines.put("")  # later reads see the end too
                code = self.proc.wait(10)
                raise RuntimeError(f"the {self.name} exited ({code}) before {event!r}; log: ...{self.log_tail(1500)}")
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("event") == event:
                return message

    def stderr(self) -> str:
        """Everything the child wrote to stderr so far (read without moving the offset the child writes at)."""
        if self._log.closed:
            return self.log_file.read_text(errors="replace") if self.log_file else ""
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.stderr()[-chars:]

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (unless it has exited) and its exit code; `subprocess.TimeoutExpired` after `timeout` s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> int:
        self.proc.kill()
        return self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, SIGKILL after `timeout` s; then `close()`. Returns the exit code."""
        try:
            code = self.terminate(timeout)
        except subprocess.TimeoutExpired:
            code = self.kill()
        self.close()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._reader.join(5)  # it closes stdout at the end of the file
        self._log.close()

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ServerProcess(ChildProcess):
    """`python -m tabserve_server` configured with TABSERVE_SERVER_* variables; ports from its 'listening' line."""

    def __init__(
        self, settings: ServerSettings | Mapping[str, object], extra_env: Mapping[str, str] | None = None, *,
        log_file: Path | None = None, cwd: Path | None = None, start_timeout: float = 120.0, name: str = "server",
    ) -> None:
        values = vars(settings) if isinstance(settings, ServerSettings) else settings
        super().__init__(
            [sys.executable, "-m", "tabserve_server"], env=prefixed_env(SERVER_ENV_PREFIX, values, extra_env),
            log_file=log_file, cwd=cwd, start_timeout=start_timeout, name=name,
        )
        self.public_port: int = self.ports["public_port"]
        self.control_port: int = self.ports["control_port"]
        self.metrics_port: int = self.ports["metrics_port"]
        self.health_port: int = self.ports.get("health_port", 0)  # 0: no plaintext health port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.public_port}"

    @property
    def control_target(self) -> str:
        return f"127.0.0.1:{self.control_port}"

    def __enter__(self) -> ServerProcess:
        return self


class MonitorProcess(ChildProcess):
    """`python -m tabserve_monitor` configured with TABSERVE_MONITOR_* variables; metrics port from its first line."""

    def __init__(
        self, settings: Mapping[str, object], extra_env: Mapping[str, str] | None = None, *,
        log_file: Path | None = None, start_timeout: float = 60.0, name: str = "monitor",
    ) -> None:
        super().__init__(
            [sys.executable, "-m", "tabserve_monitor"], env=prefixed_env(MONITOR_ENV_PREFIX, settings, extra_env),
            log_file=log_file, start_timeout=start_timeout, name=name,
        )
        self.metrics_port: int = self.ports["metrics_port"]

    def __enter__(self) -> MonitorProcess:
        return self


class ServiceProcess:
    """A third-party service on a loopback port (fixed across restarts, so clients reconnect to the same address).

    It runs in a session of its own and is stopped as a process group: services such as `mlflow server` start
    workers that would outlive a signal to the parent alone. Subclasses say how to start it (`command`) and how
    to tell it is up (`healthy`); `popen_options` adds what a subclass needs (another user, for example).
    """

    name = "service"
    stop_signal = signal.SIGTERM  # asks the service to end; SIGKILL follows after the stop timeout

    def __init__(self, log_file: Path, port: int | None = None, env: Mapping[str, str] | None = None) -> None:
        self.port = port or free_port()
        self._log_file = log_file
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def popen_options(self) -> dict[str, Any]:
        return {}

    def start(self) -> ServiceProcess:
        """Begin start-up (tens of seconds on a busy machine for some); `wait_healthy` waits for it."""
        assert self.proc is None, "already started"
        with self._log_file.open("a") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, env=self._env,
                **self.popen_options(),
            )
        return self

    def wait_healthy(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): ...{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} on port {self.port} not healthy after {timeout} s")
            time.sleep(0.5)

    def cpu_seconds(self) -> float:
        """CPU time of the service and its direct children (e.g. a uvicorn worker) so far."""
        if self.proc is None:
            return 0.0
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            pids += [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def terminate(self) -> None:
        """`stop_signal` to the service's process group (its own session: only our children are in it); no wait."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, self.stop_signal)

    def _leader_exited(self, pid: int) -> bool:
        """True once the leader is a zombie (exited, not yet reaped, so its group id cannot be reused)."""
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    def stop(self, timeout: float = 15.0) -> None:
        """`stop_signal` to the group, SIGKILL to what is left of it after `timeout` s (or once the leader exited)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, self.stop_signal)
            deadline = time.monotonic() + timeout
            while not self._leader_exited(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, before the leader is reaped
            proc.wait(10)
        deadline = time.monotonic() + 15
        while self.healthy() and time.monotonic() < deadline:  # the port is free again for a restart
            time.sleep(0.2)

    def log(self) -> str:
        return self._log_file.read_text(errors="replace")

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def http_ok(url: str) -> bool:
    """True when GET `url` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class MlflowServer(ServiceProcess):
    """A real `mlflow server` on loopback over an existing backend store (a SQLite file or a PostgreSQL database).

    `serve_artifacts` (the default): the server proxies artifacts (`mlflow-artifacts:` URIs) to
    `artifacts_destination`, a directory or an s3:// URI; clients need no store credentials. Without it, new
    experiments keep their artifacts at `artifacts_destination` (`--default-artifact-root`) and every client reads
    and writes them there itself. `env` adds to the server's environment (the object store's endpoint and
    credentials, for example). Job execution is disabled (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false): only the
    registry is needed, and its huey consumers would be more processes to stop.
    """

    name = "mlflow server"

    def __init__(
        self, backend_store_uri: str, artifacts_destination: Path | str, log_file: Path, port: int | None = None, *,
        serve_artifacts: bool = True, env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(log_file, port, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"
        self._backend_store_uri = backend_store_uri
        self._artifacts = str(artifacts_destination)
        self._serve_artifacts = serve_artifacts

    def command(self) -> list[str]:
        artifacts = (["--artifacts-destination", self._artifacts] if self._serve_artifacts
                     else ["--no-serve-artifacts", "--default-artifact-root", self._artifacts])
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", self._backend_store_uri, *artifacts, "--workers", "1"]

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/health")

    def start(self) -> MlflowServer:
        super().start()
        return self

    def __enter__(self) -> MlflowServer:
        return self
