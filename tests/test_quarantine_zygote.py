"""The verifier zygote's own failure modes: a forked child's end is judged as a spawned verifier's, a dead zygote
never fails a verification and is replaced, and neither the zygote nor its children outlive their parent."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tabserve_server.core.artifact import read_files
from tabserve_server.core.verify import Verdict, Verifier, VerifyLimits
from tabserve_server.core.verify.process import VERIFIER_ENV
from tabserve_server.errors import VerifierFailed
from tests.corrupt import fault_copies
from tests.support import MODEL_NAME, wait_for
from tests.verifiers import catch, gone, stat, verifiers, zygotes

LIMITS = VerifyLimits(timeout_seconds=60, max_model_bytes=2**30, allow_pyfunc=False)
FALLBACK = "verifying in a process of its own"  # zygote.py's warning when a verification falls back


@pytest.fixture(scope="module")
def faults(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fault_copies(tracking_uri, MODEL_NAME, tmp_path_factory.mktemp("zygote-faults"), ("half",))


@pytest.fixture(scope="module")
def verifier() -> Iterator[Verifier]:
    checker = Verifier(LIMITS, zygote=True)
    checker.start()
    try:
        yield checker
    finally:
        checker.close()


def _zygote(verifier: Verifier) -> int:
    assert verifier.zygote is not None
    pid = verifier.zygote.pid
    assert pid is not None, "no zygote runs"
    return pid


def _in_thread(verifier: Verifier, directory: Path, label: str) -> tuple[threading.Thread, list[object]]:
    """Runs one verification in a thread; its verdict or exception lands in the list."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(verifier.verify(directory, label))
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_a_good_model_passes_in_a_child_of_the_zygote(
    verifier: Verifier, faults: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    zygote = _zygote(verifier)
    with caplog.at_level(logging.WARNING):
        verdict = verifier.verify(faults["good"], "good")
    assert verdict.digest == read_files(faults["good"], "good", 2**30).digest and verdict.fast_path
    assert FALLBACK not in caplog.text and _zygote(verifier) == zygote


def test_an_artifact_that_crashes_its_child_is_a_crash_in_words_and_the_zygote_lives_on(
    verifier: Verifier, faults: dict[str, Path]
) -> None:
    zygote = _zygote(verifier)
    with pytest.raises(VerifierFailed, match=r"parser crashed with signal \d+ \(\w+\) while loading half") as caught:
        verifier.verify(faults["half"], "half")
    assert caught.value.reason == "crash" and _zygote(verifier) == zygote


def test_a_child_killed_mid_load_is_a_crash_in_words(verifier: Verifier, faults: dict[str, Path]) -> None:
    zygote = _zygote(verifier)
    for _ in range(10):  # until one child is caught alive (it lives a fraction of a second)
        thread, result = _in_thread(verifier, faults["good"], "models:/credit-default/7")
        pids = wait_for(lambda: list(verifiers()), timeout=10, interval=0.001, what="the forked verifier")
        caught = catch(pids[0])
        if caught:
            os.kill(pids[0], signal.SIGKILL)
        thread.join(30)
        if caught:
            break
    assert len(result) == 1 and isinstance(result[0], VerifierFailed) and result[0].reason == "crash"
    assert "crashed with signal 9 (SIGKILL, perhaps out of memory) while loading models:/credit-default/7" in str(
        result[0])
    assert _zygote(verifier) == zygote


def test_a_child_past_its_time_limit_is_killed_and_says_so(verifier: Verifier, faults: dict[str, Path]) -> None:
    zygote = _zygote(verifier)
    verifier.limits = dataclasses.replace(LIMITS, timeout_seconds=0.001)
    try:
        with pytest.raises(VerifierFailed, match=r"ran past load_timeout_seconds \(0.001 s\)") as caught:
            verifier.verify(faults["good"], "good")
    finally:
        verifier.limits = LIMITS
    assert caught.value.reason == "timeout" and not verifiers(), "the forked verifier was left running"
    assert _zygote(verifier) == zygote


def test_a_killed_zygote_is_replaced_by_the_next_verification(
    verifier: Verifier, faults: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    old = _zygote(verifier)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: gone(old), timeout=5, what="the zygote dead")
    with caplog.at_level(logging.WARNING):
        assert isinstance(verifier.verify(faults["good"], "good"), Verdict)
    new = _zygote(verifier)
    assert new != old and zygotes() == [new] and FALLBACK not in caplog.text


def test_a_zygote_killed_mid_verification_takes_its_child_along_and_the_verification_passes(
    verifier: Verifier, faults: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    old = _zygote(verifier)
    with caplog.at_level(logging.WARNING):
        thread, result = _in_thread(verifier, faults["good"], "good")
        children = wait_for(lambda: list(verifiers()), timeout=10, interval=0.001, what="the forked verifier")
        assert catch(children[0]), "the forked verifier ended before it was caught"  # held mid-load
        os.kill(old, signal.SIGKILL)
        thread.join(60)
    assert len(result) == 1 and isinstance(result[0], Verdict), result
    assert FALLBACK in caplog.text  # verified in a process of its own
    wait_for(lambda: all(gone(pid) for pid in children), timeout=5, what="the orphaned child dead")
    new = _zygote(verifier)  # restarted after that verification
    assert new != old and zygotes() == [new]


def test_the_zygote_and_its_child_die_with_the_serving_process_even_stopped(faults: dict[str, Path]) -> None:
    """A stopped process gets SIGKILL all the same: the parent-death signal is armed before anything runs."""
    code = textwrap.dedent("""
        import sys, threading; from pathlib import Path
        from tabserve_server.core.verify import Verifier, VerifyLimits
        verifier = Verifier(VerifyLimits(600, 2**30, False), zygote=True)
        threading.Thread(target=verifier.verify, args=(Path(sys.argv[1]), "good"), daemon=True).start()
        sys.stdin.read()
    """)
    with subprocess.Popen([sys.executable, "-c", code, str(faults["good"])], stdin=subprocess.PIPE) as serving:
        try:
            found = wait_for(lambda: (z := zygotes({serving.pid})) and (c := verifiers({serving.pid})) and (z, c),
                             timeout=60, interval=0.001, what="the zygote and its child")
            stopped = [*found[0], *found[1]]
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            serving.kill()
            serving.wait(10)
            wait_for(lambda: all(gone(pid) for pid in stopped), timeout=10, what="the zygote and its child gone")
        finally:
            serving.kill()


def test_a_spawned_process_is_armed_to_die_with_its_parent_before_its_own_code_runs() -> None:
    """The child here never arms anything itself: only `lifeline.spawn_prefix` can make it die with its parent."""
    code = textwrap.dedent("""
        import os, subprocess, sys
        from tabserve_server.core.verify import lifeline
        child = subprocess.Popen([*lifeline.spawn_prefix(), sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        sys.stdin.read()
    """)
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        try:
            parent.kill()
            parent.wait(10)
            wait_for(lambda: gone(child), timeout=10, what="the child dead with its parent")
        finally:
            if not gone(child):
                os.kill(child, signal.SIGKILL)


def test_a_child_stopped_before_its_first_step_dies_with_its_zygote() -> None:
    """The forked child stops itself before anything of its own runs, as a SIGSTOP landing between the fork and
    `lifeline.arm` would leave it: no parent-death signal is armed, so only its orphaned process group ends it."""
    code = textwrap.dedent("""
        import os, signal
        from tabserve_server.core.verify import fork_server
        child = fork_server._child
        def stopped_first(*args):
            os.kill(os.getpid(), signal.SIGSTOP)
            child(*args)
        fork_server._child = stopped_first
        fork_server.main(["--lean"])
    """)
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          env={**os.environ, **VERIFIER_ENV}, start_new_session=True) as zygote:  # as zygote.py
        assert zygote.stdin is not None and zygote.stdout is not None
        child = 0
        try:
            assert "ready" in json.loads(zygote.stdout.readline())
            zygote.stdin.write(b'{"argv": ["/nonexistent"], "nice": 0}\n')
            zygote.stdin.flush()
            child = int(json.loads(zygote.stdout.readline())["pid"])
            wait_for(lambda: stat(child)[0] in "Tt", timeout=10, interval=0.01, what="the child stopped")
            zygote.kill()
            zygote.wait(10)
            wait_for(lambda: gone(child), timeout=10, what="the stopped child dead with its zygote")
        finally:
            zygote.kill()
            if child and not gone(child):
                os.kill(child, signal.SIGKILL)
