"""Verifier processes die with the process that started them: the kernel's parent-death signal, armed first.

`spawn_prefix()` starts a process through util-linux's `setpriv --pdeathsig KILL`, which arms the signal and
then executes the command (the signal survives exec), so no instant of the child's life, not even the
interpreter's start-up, can outlive a dead server: a verifier stopped (SIGSTOP) before its own code ran would
otherwise never arm it. Not a `preexec_fn`: with one, CPython runs the parent's at-fork hooks (threading's among
them) in the child of a threaded server before the exec, and a verifier child once died there ("Fatal Python
error: Aborted" in `threading._after_fork`). `arm(parent)` arms it in a child forked by the zygote, as the first
thing it does, and again in a spawned process (harmless, and its only arming where `setpriv` is missing). The
kernel sends the signal when the *thread* that forked the child ends: start a child from a thread that outlives
it (zygote.py keeps one for that).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: the caller's time limit still bounds a verifier


# Resolved once here: a child forked from a threaded server should call nothing that takes a lock (dlopen does).
_PRCTL = _prctl()


def arm(parent_pid: int) -> None:
    """Die by SIGKILL when the parent dies; exit at once if `parent_pid` (0: unknown) is already not the parent.

    The parent's pid is compared, never assumed to be 1 when it is gone: in a container the server is PID 1."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)


# Resolved once: util-linux is in every Debian system (the image's base included).
_SETPRIV = shutil.which("setpriv")


def spawn_prefix() -> list[str]:
    """What goes before a command so that its process is armed before its own code runs (module docstring);
    nothing where `setpriv` is missing (then the process's own `arm` is its only arming)."""
    return [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []


def name(comm: str) -> None:
    """Set this process's name as ps and /proc/PID/comm show it (15 bytes at most), so a forked child is told apart."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_NAME, comm.encode()[:15])


__all__ = ["arm", "name", "spawn_prefix"]
