"""A bad artifact never takes serving down: every fault of the matrix is refused by the verifier process.

Corrupted copies of one trained model (tests/corrupt.py), stated as local model directories (the same
verification path as a registry download or the cache). The servers are real processes shared by the
cells of one mode (single process, workers=2); callers score throughout each cell.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tabserve_client import ScoringClient, aspired_version
from tabserve_demo.applicants import FEATURE_NAMES
from tabserve_demo.processes import ServerProcess
from tabserve_server.core.artifact import read_files
from tabserve_server.core.loading import DIGEST_TAG
from tabserve_server.core.verify import VerifyLimits, verify
from tabserve_server.errors import ModelLoadError, VerifierFailed
from tests.corrupt import FAULTS, fault_copies
from tests.support import MODEL_NAME, Server, required_command, server_settings, wait_for
from tests.verifiers import catch, started, stat, verifiers

DIGEST_CHECK = "digest-check"
LOAD_TIMEOUT = 10.0  # the shared servers' load_timeout_seconds: far above a verification, short for the hang test
VERIFIER_NICE = 7

# What the status says for each fault: a crash of the parser in words, or the parser's own refusal.
EXPECTED = {
    "half": "crashed with signal", "zero": "LightGBM cannot read", "header-only": "crashed with signal",
    "mid-tree": "crashed with signal", "random": "LightGBM cannot read", "flipped": "crashed with signal",
    "more-trees": "crashed with signal", "more-features": "LightGBM cannot read",
    "signature-mismatch": "signature has 188 features, the booster 189",
}


@pytest.fixture(scope="module")
def faults(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fault_copies(tracking_uri, MODEL_NAME, tmp_path_factory.mktemp("faults"))


class Callers:
    """Scores one row in a loop until stopped; counts the calls that failed."""

    def __init__(self, target: str) -> None:
        self.calls = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self._thread.start()

    def _run(self, target: str) -> None:
        with ScoringClient(target, timeout=5) as client:
            while not self._stop.is_set():
                try:
                    client.score(np.zeros((1, len(FEATURE_NAMES))))
                except Exception:
                    self.failures += 1
                self.calls += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _serving(workers: int, tracking_uri: str, cache: Path, **settings: object) -> Iterator[Server]:
    serving = Server(server_settings(tracking_uri, cache, workers=workers, load_timeout_seconds=LOAD_TIMEOUT,
                                     verifier_nice=VERIFIER_NICE, **settings))
    try:
        serving.settle_on("1", timeout=120)
        yield serving
    finally:
        serving.close()


@pytest.fixture(scope="module", params=[1, 2], ids=["single", "workers2"])
def server(request: pytest.FixtureRequest, tracking_uri: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    """A server serving version 1 from the registry; its cache then holds version 1."""
    yield from _serving(request.param, tracking_uri, tmp_path_factory.mktemp(f"quarantine-cache-{request.param}"))


@pytest.fixture(scope="module", params=[1, 2], ids=["single", "workers2"])
def spawning_server(request: pytest.FixtureRequest, tracking_uri: str, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[Server]:
    """As `server`, with every verifier spawned (`verifier_zygote` off). The tests that signal a verifier must
    catch it alive from a /proc poll; a child forked by the zygote can finish its verification before the poll
    sees it on an idle machine (seen in CI: "saw 0 verifiers in 60 s"). The zygote's own kill, crash and time-limit
    cases are in tests/test_quarantine_zygote.py."""
    cache = tmp_path_factory.mktemp(f"quarantine-spawn-cache-{request.param}")
    yield from _serving(request.param, tracking_uri, cache, verifier_zygote=False)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_version_is_refused_on_reload_and_the_old_one_keeps_serving(
    server: Server, faults: dict[str, Path], fault: str
) -> None:
    reason = "crash" if "crashed" in EXPECTED[fault] else "refused"
    failures = server.metric("tabserve_server_model_load_failures_total", reason=reason) or 0.0
    pid = server.process.pid
    callers = Callers(server.target)
    try:
        version = f"bad-{fault}"
        server.control.set_aspired(aspired_version(str(faults[fault]), name=MODEL_NAME, version=version))
        status = wait_for(
            lambda: (s := server.status()).failed_version == version and EXPECTED[fault] in s.last_error and s,
            timeout=60, interval=0.1, what=f"the {fault} version refused",
        )
        assert status.serving.version == "1"
    finally:
        callers.stop()
    assert server.process.proc.poll() is None and server.process.pid == pid
    assert callers.calls > 0 and callers.failures == 0
    assert EXPECTED[fault] in server.process.stderr()
    wait_for(lambda: (server.metric("tabserve_server_model_load_failures_total", reason=reason) or 0.0) > failures,
             timeout=10, what=f"a load failure counted as {reason}")
    server.settle_on("1")


@pytest.fixture(scope="module")
def mismatched_version(tracking_uri: str, faults: dict[str, Path]) -> str:
    """A registry version of the good model files whose digest tag names other bytes."""
    client = MlflowClient(tracking_uri, tracking_uri)
    if not client.search_registered_models(filter_string=f"name = '{DIGEST_CHECK}'"):
        client.create_registered_model(DIGEST_CHECK)
    version = client.create_model_version(DIGEST_CHECK, source=str(faults["good"])).version
    client.set_model_version_tag(DIGEST_CHECK, version, DIGEST_TAG, "0" * 64)
    return f"models:/{DIGEST_CHECK}/{version}"


def test_the_served_version_reports_the_digest_of_the_bytes_it_was_verified_with(
    server: Server, faults: dict[str, Path]
) -> None:
    digest = read_files(faults["good"], "good", 2**30).digest
    with ScoringClient(server.target) as client:
        assert client.model_info().digest == digest
    assert server.status().serving.digest == digest  # with workers=2, the supervisor's aggregate carries it


def test_a_version_whose_model_file_does_not_match_its_digest_tag_is_refused(
    server: Server, mismatched_version: str
) -> None:
    server.control.set_aspired(aspired_version(mismatched_version))
    status = wait_for(lambda: (s := server.status()).last_error and s, timeout=60, interval=0.1,
                      what="the mismatched version refused")
    assert f"but the version's tag {DIGEST_TAG} says {'0' * 64}: refused" in status.last_error
    assert status.serving.version == "1"
    server.settle_on("1")


def test_a_version_that_crashed_its_verifier_is_retried_no_faster_than_the_back_off(
    server: Server, faults: dict[str, Path]
) -> None:
    """retry_initial_seconds 0.2, retry_max_seconds 1.0 (tests/support.py): attempt n waits min(1.0, 0.2 * 2**(n-1))."""
    server.control.set_aspired(aspired_version(str(faults["half"]), name=MODEL_NAME, version="bad-backoff"))
    seen: dict[int, tuple[float, float]] = {}  # attempt -> (failed at, next attempt at), Unix seconds

    def five_attempts() -> bool:
        status = server.status()
        status = status.workers[0].status if status.workers else status  # one worker's attempts: each backs off alone
        if status.failed_version == "bad-backoff" and status.failed_attempts:
            seen.setdefault(status.failed_attempts, (status.last_error_at.ToMicroseconds() / 1e6,
                                                     status.next_attempt_at.ToMicroseconds() / 1e6))
        return len(seen) >= 1 and max(seen) >= 5

    wait_for(five_attempts, timeout=60, interval=0.02, what="five failed attempts")
    assert {3, 4, 5} <= set(seen)
    for attempt in (3, 4):
        failed_at, next_at = seen[attempt]
        assert next_at - failed_at == pytest.approx(min(1.0, 0.2 * 2 ** (attempt - 1)), abs=0.05)
        assert seen[attempt + 1][0] >= next_at - 0.02, f"attempt {attempt + 1} came before its back-off ended"
    server.settle_on("1")


def test_a_verifier_killed_mid_load_is_a_failed_load_retried_after_its_back_off(
    spawning_server: Server, faults: dict[str, Path]
) -> None:
    """The first three verifiers of a good version (each worker's) die by SIGKILL; the fourth attempt serves it."""
    server = spawning_server
    crashes = server.metric("tabserve_server_model_load_failures_total", reason="crash") or 0.0
    logged = server.process.stderr().count("crashed with signal 9")
    pid, version = server.process.pid, "good-killed"
    callers = Callers(server.target)
    try:
        server.control.set_aspired(aspired_version(str(faults["good"]), name=MODEL_NAME, version=version))
        kills = _signal_verifiers(_serving_processes(server), per_parent=3, sig=signal.SIGKILL, timeout=60)
        status = wait_for(lambda: (s := server.status()).last_error and s, timeout=10, what="the failure")
        assert "crashed with signal 9 (SIGKILL, perhaps out of memory) while loading" in status.last_error
        assert status.serving.version == "1"
        wait_for(lambda: server.settled_on(version), timeout=60, what="the retry after the kills served")
    finally:
        callers.stop()
    assert server.process.proc.poll() is None and server.process.pid == pid
    assert callers.calls > 0 and callers.failures == 0
    assert server.metric("tabserve_server_model_load_failures_total", reason="crash") == crashes + len(kills)
    assert server.process.stderr().count("crashed with signal 9") - logged == len(kills)
    for parent in {k.parent for k in kills}:
        mine = [k for k in kills if k.parent == parent]
        for attempt, (killed, retried) in enumerate(itertools.pairwise(mine), start=1):
            back_off = min(1.0, 0.2 * 2 ** (attempt - 1))  # retry_* of tests/support.py
            assert retried.started - killed.signalled >= back_off - 0.02, (  # the kernel's start time: 10 ms ticks
                f"attempt {attempt + 1} started {retried.started - killed.signalled:.3f} s after the kill")
    server.settle_on("1")


def test_a_verifier_that_hangs_past_load_timeout_seconds_is_killed_and_the_old_version_keeps_serving(
    spawning_server: Server, faults: dict[str, Path]
) -> None:
    """SIGSTOP makes the verifier hang as a process stuck on a dead disk would: alive, doing nothing."""
    server = spawning_server
    timeouts = server.metric("tabserve_server_model_load_failures_total", reason="timeout") or 0.0
    version = "good-hung"
    callers = Callers(server.target)
    stopped: list[Signalled] = []
    try:
        server.control.set_aspired(aspired_version(str(faults["good"]), name=MODEL_NAME, version=version))
        stopped += _signal_verifiers(_serving_processes(server), per_parent=1, sig=signal.SIGSTOP, timeout=60)
        for hung in stopped:  # verifier_nice above the process that started it
            wait_for(lambda h=hung: stat(h.pid)[16] == str(min(19, int(stat(h.parent)[16]) + VERIFIER_NICE)),
                     timeout=5,
                     what="the verifier at its lower priority")
        status = wait_for(lambda: "ran past load_timeout_seconds" in (s := server.status()).last_error and s,
                          timeout=LOAD_TIMEOUT + 30, interval=0.1, what="the hung verifier killed")
        failed_after = time.clock_gettime(time.CLOCK_BOOTTIME) - min(k.started for k in stopped)  # first to fail
        assert f"ran past load_timeout_seconds ({LOAD_TIMEOUT:g} s) while loading" in status.last_error
        assert status.serving.version == "1"
        assert failed_after >= LOAD_TIMEOUT - 0.5, "the verifier was given less than its time limit"
        wait_for(lambda: not any(Path(f"/proc/{k.pid}").exists() for k in stopped), timeout=10,
                 what="the hung verifiers gone")
        wait_for(lambda: server.settled_on(version), timeout=60, what="the retry served")
    finally:
        callers.stop()
        for hung in stopped:  # when the server failed to: a stopped verifier may not have armed its death signal
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung.pid, signal.SIGKILL)
    assert callers.calls > 0 and callers.failures == 0
    assert server.metric("tabserve_server_model_load_failures_total", reason="timeout") == timeouts + len(stopped)
    server.settle_on("1")


@pytest.mark.parametrize("fault", FAULTS)
def test_start_up_on_a_bad_version_serves_the_cached_one(
    server: Server, faults: dict[str, Path], fault: str
) -> None:
    """Same cache directory as the shared server (read only here: nothing new loads), a bad start-up target."""
    settings = server_settings(
        server.settings.tracking_uri, Path(server.settings.cache_dir), workers=server.settings.workers,
        model_uri=str(faults[fault]), model_name=MODEL_NAME,
    )
    with ServerProcess(settings) as started, ScoringClient(started.target, timeout=10) as client:
        wait_for(lambda: client.health() == "SERVING", timeout=90, what="SERVING from the cache")
        info = client.model_info()
        assert (info.loaded_from, info.version) == ("cache", "1")
        client.score(np.zeros((2, len(FEATURE_NAMES))))
        wait_for(lambda: EXPECTED[fault] in started.stderr(), timeout=10, what="the reason in the log")
        assert started.terminate() == 0


LIMITS = VerifyLimits(timeout_seconds=60, max_model_bytes=2**30, allow_pyfunc=False)


def test_the_verifier_passes_a_good_model_with_the_digest_of_its_bytes(faults: dict[str, Path]) -> None:
    verdict = verify(faults["good"], "good", LIMITS)
    assert (verdict.flavor, verdict.features, verdict.fast_path) == ("lightgbm", len(FEATURE_NAMES), True)
    assert verdict.digest.startswith("sha256:") and verdict.digest == read_files(faults["good"], "good", 2**30).digest
    assert verdict.digest != read_files(faults["flipped"], "flipped", 2**30).digest


def test_a_verifier_past_its_time_limit_is_killed_and_says_so(faults: dict[str, Path]) -> None:
    started = time.monotonic()
    with pytest.raises(VerifierFailed, match=r"ran past load_timeout_seconds \(0.05 s\)") as caught:
        verify(faults["good"], "good", VerifyLimits(0.05, 2**30, False))
    assert caught.value.reason == "timeout" and time.monotonic() - started < 5
    assert not verifiers(), "the verifier process was left running"


def test_a_verifier_killed_mid_load_is_a_crash_in_words(faults: dict[str, Path]) -> None:
    result: list[BaseException] = []

    def run() -> None:
        try:
            verify(faults["good"], "models:/credit-default/7", LIMITS)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    pids = wait_for(lambda: list(verifiers()), timeout=10, interval=0.01, what="the verifier process")
    os.kill(pids[0], 9)
    thread.join(30)
    assert len(result) == 1 and isinstance(result[0], VerifierFailed) and result[0].reason == "crash"
    assert "crashed with signal 9 (SIGKILL, perhaps out of memory) while loading models:/credit-default/7" in str(
        result[0])


def test_a_model_file_over_max_model_bytes_is_refused_unread(faults: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match=r"model.lgb is \d+ bytes, more than max_model_bytes \(100000\)"):
        verify(faults["good"], "good", VerifyLimits(60, 100_000, False))


def test_a_server_that_is_pid_1_gets_its_verdict(faults: dict[str, Path]) -> None:
    """In a container the server is PID 1 (Kubernetes runs the command as the container's first process): its
    verifier must not take a parent whose pid is 1 for a dead one (every load failed so in the image)."""
    unshare = required_command("unshare", "util-linux")
    code = ("import os, sys; from pathlib import Path; from tabserve_server.core.verify import VerifyLimits, verify; "
            "assert os.getpid() == 1; print(verify(Path(sys.argv[1]), 'good', VerifyLimits(60, 2**30, False)).flavor)")
    done = subprocess.run([unshare, "--pid", "--fork", "--kill-child", sys.executable, "-c", code, str(faults["good"])],
                          capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "lightgbm"), done.stderr[-2000:]


@dataclass(frozen=True)
class Signalled:
    pid: int
    parent: int  # the serving process it verifies for (a worker, with workers=2)
    started: float  # CLOCK_BOOTTIME seconds, as the kernel recorded its start
    signalled: float  # CLOCK_BOOTTIME seconds


def _serving_processes(server: Server) -> set[int]:
    """The processes that load models: the server itself, or each worker of a supervisor."""
    return {w.pid for w in server.status().workers} or {server.process.pid}


def _signal_verifiers(parents: set[int], *, per_parent: int, sig: int, timeout: float) -> list[Signalled]:
    """Signal the first `per_parent` verifiers each of `parents` starts, each as soon as it is seen."""
    done: list[Signalled] = []
    deadline = time.monotonic() + timeout
    while len(done) < per_parent * len(parents):
        if time.monotonic() > deadline:
            raise AssertionError(f"saw {len(done)} verifiers in {timeout} s, expected {per_parent} per process")
        for pid, parent in verifiers(parents).items():
            if any(d.pid == pid for d in done) or sum(d.parent == parent for d in done) >= per_parent:
                continue
            try:
                when = started(pid)
                if not catch(pid):
                    continue  # a forked verifier lives a fraction of a second: this one ended first, not counted
                os.kill(pid, sig)
            except (OSError, IndexError):
                continue  # finished before the signal: not counted
            done.append(Signalled(pid, parent, when, time.clock_gettime(time.CLOCK_BOOTTIME)))
        time.sleep(0.001)
    return done
