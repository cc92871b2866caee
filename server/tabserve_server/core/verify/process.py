"""Runs the verifier process on one artifact (a fresh interpreter: the spawn path) and turns how a verifier
process ended, spawned or forked by the zygote (zygote.py), into a verdict or a failed load in words."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabserve_server.core.verify import lifeline
from tabserve_server.errors import ModelLoadError, VerifierFailed

VERDICT_MARK = "TABSERVE-VERDICT "  # starts the last line the verifier process prints (__main__.py)


@dataclass(frozen=True)
class VerifyLimits:
    timeout_seconds: float  # wall clock, from process start to verdict
    max_model_bytes: int
    allow_pyfunc: bool
    nice: int = 0  # added to this process's niceness for the verifier's
    limit_name: str = "load_timeout_seconds"  # the setting `timeout_seconds` comes from, named when it is hit


@dataclass(frozen=True)
class Verdict:
    """A version that passed: `digest` names the bytes that were checked."""

    digest: str
    flavor: str
    features: int
    fast_path: bool
    seconds: float
    compiled: dict[str, Any] | None = None  # with `compile_to`: the facts core/compiled.py wrote there


@dataclass(frozen=True)
class Ended:
    """How one verifier process ended: `code` as Popen.returncode (-N: killed by signal N), and its output."""

    code: int
    output: str
    timed_out: bool = False


def arguments(directory: Path, label: str, limits: VerifyLimits, parent_pid: int, *, compile_to: Path | None = None,
              threshold: float = 0.5) -> list[str]:
    """The verifier's command-line arguments (__main__.py), for a process whose parent is `parent_pid`."""
    args = [str(directory), "--label", label, "--max-model-bytes", str(limits.max_model_bytes),
            "--parent-pid", str(parent_pid)]
    if compile_to is not None:
        args += ["--compile-to", str(compile_to), "--threshold", repr(threshold)]
    return [*args, "--allow-pyfunc"] if limits.allow_pyfunc else args


# One OpenMP (and BLAS) thread: the warm-up rows are few, and the serving process keeps the cores.
VERIFIER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def verify(directory: Path, label: str, limits: VerifyLimits, compile_to: Path | None = None,
           threshold: float = 0.5) -> Verdict:
    """Check the model in `directory` in a fresh process; raise ModelLoadError (VerifierFailed: it died) if unfit.

    With `compile_to`, the process also compiles it there for the compiled backend (core/compiled.py)."""
    command = [*lifeline.spawn_prefix(), sys.executable, "-m", "tabserve_server.core.verify",
               *arguments(directory, label, limits, os.getpid(), compile_to=compile_to, threshold=threshold)]
    started = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env={**os.environ, **VERIFIER_ENV}, start_new_session=True) as child:
        lower_priority(child.pid, limits.nice)
        try:
            output, _ = child.communicate(timeout=limits.timeout_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
            return judge(Ended(-signal.SIGKILL, "", timed_out=True), label, limits, started)
    return judge(Ended(child.returncode, output.decode(errors="replace")), label, limits, started)


def judge(ended: Ended, label: str, limits: VerifyLimits, started: float) -> Verdict:
    """The verdict of a verifier process that ended so, or the failed load it means, in words."""
    if ended.timed_out:
        raise VerifierFailed(
            f"model verifier ran past {limits.limit_name} ({limits.timeout_seconds:g} s) while loading {label}"
            "; killed", "timeout",
        )
    verdict = _verdict(ended.output)
    if ended.code < 0:
        number = -ended.code
        raise VerifierFailed(
            f"model parser crashed with signal {number} ({_signal_name(number)}) while loading {label}"
            f"{_last_words(ended.output)}", "crash",
        )
    if verdict is None:
        raise VerifierFailed(
            f"model verifier exited with status {ended.code} and no verdict while loading {label}"
            f"{_last_words(ended.output)}", "crash",
        )
    if not verdict.get("ok"):
        refused = ModelLoadError(str(verdict.get("error") or "refused by the verifier"))
        refused.reason = str(verdict.get("reason") or refused.reason)
        raise refused
    return Verdict(str(verdict["digest"]), str(verdict["flavor"]), int(verdict["features"]),
                   bool(verdict["fast_path"]), time.monotonic() - started, verdict.get("compiled"))


def lower_priority(pid: int, nice: int) -> None:
    """Set right after the start (the interpreter's own start-up included), so no code of the child's own has to.

    Niceness only weighs the verifier against runnable request threads: on idle cores it runs at full speed.
    Relative to this process's main thread (its pid), not to the calling thread: on Linux a thread has a niceness
    of its own, and the loader thread that starts verifiers runs at `loader_nice` already."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice))
    except OSError:
        return  # already gone: its end is judged below as usual


def _verdict(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith(VERDICT_MARK):
            try:
                found = json.loads(line[len(VERDICT_MARK):])
            except ValueError:
                return None
            return found if isinstance(found, dict) else None
    return None


def _signal_name(number: int) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        return "unknown signal"
    return f"{name}, perhaps out of memory" if number == signal.SIGKILL else name


def _last_words(text: str) -> str:
    """The child's last line of output (often LightGBM's `[Fatal]` message), to say why in the same sentence."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(VERDICT_MARK)]
    fatal = [line for line in lines if "[Fatal]" in line or "Error" in line]
    last = (fatal or lines or [""])[-1]
    return f": {last[:300]}" if last else ""
