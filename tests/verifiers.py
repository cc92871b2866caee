"""Finds verifier processes as the kernel sees them: spawned by a serving process, or forked by its zygote.

A forked verifier lives a fraction of a second, so a poll lists /proc once and reads only the pids it has not
seen before (a few ms under load, where reading every process takes tens).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import NamedTuple

from tabserve_server.core.verify.fork_server import CHILD_NAME

ZYGOTE = b"tabserve_server.core.verify.fork_server"
SPAWNED = b"tabserve_server.core.verify"


# Read again while this young: between its fork and its exec a process shows its parent's command, and a forked
# verifier names itself only after its first steps.
YOUNG_SECONDS = 0.5


class Proc(NamedTuple):
    parent: int
    command: bytes  # /proc/PID/cmdline (a forked child keeps its zygote's)
    started: float  # CLOCK_BOOTTIME seconds
    name: str  # /proc/PID/comm: a forked verifier names itself once it armed its parent-death signal


_seen: dict[int, Proc] = {}


def processes() -> dict[int, Proc]:
    """Every process by pid."""
    pids = {int(name) for name in os.listdir("/proc") if name.isdigit()}
    young = time.clock_gettime(time.CLOCK_BOOTTIME) - YOUNG_SECONDS
    for pid in set(_seen) - pids:
        del _seen[pid]
    for pid in pids - {pid for pid, proc in _seen.items() if proc.started < young}:
        try:
            fields = stat(pid)
            _seen[pid] = Proc(int(fields[1]), Path(f"/proc/{pid}/cmdline").read_bytes(), started(pid),
                              Path(f"/proc/{pid}/comm").read_text().strip())
        except (OSError, IndexError):
            continue
    return dict(_seen)


def stat(pid: int) -> list[str]:
    """/proc/PID/stat from its third field (state) on: [16] is the niceness, [19] the start time in ticks."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def started(pid: int) -> float:
    """When `pid` started, in CLOCK_BOOTTIME seconds (the kernel's start time, to its clock tick)."""
    return int(stat(pid)[19]) / os.sysconf("SC_CLK_TCK")


def _is_zygote(pid: int, found: dict[int, Proc]) -> bool:
    """A zygote's command names fork_server; so does its children's (forked), but their parent's does too."""
    proc = found.get(pid)
    parent = found.get(proc.parent) if proc is not None else None
    return proc is not None and ZYGOTE in proc.command and (parent is None or ZYGOTE not in parent.command)


def verifiers(parents: set[int] | None = None) -> dict[int, int]:
    """Verifier pid -> the serving process it verifies for (one of `parents`, default: this process)."""
    parents = parents or {os.getpid()}
    found = processes()
    mine = {}
    for pid, proc in found.items():
        if _is_zygote(proc.parent, found):  # forked by a zygote, itself a child of the serving process
            if proc.name != CHILD_NAME:
                continue  # not yet armed to die with the zygote: a signal now is not what a verifier meets
            serving = found[proc.parent].parent
        elif SPAWNED in proc.command and ZYGOTE not in proc.command:
            serving = proc.parent
        else:
            continue
        if serving in parents:
            mine[pid] = serving
    return mine


def zygotes(parents: set[int] | None = None) -> list[int]:
    """Pids of the verifier zygotes started by `parents` (default: this process)."""
    parents = parents or {os.getpid()}
    found = processes()
    return [pid for pid, proc in found.items() if proc.parent in parents and _is_zygote(pid, found)]


def catch(pid: int, timeout: float = 2.0) -> bool:
    """Stop `pid` (SIGSTOP) and say whether it was caught alive: a forked verifier may end before a signal lands,
    and a signal sent to one that ended says nothing about what it does to a verification."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = stat(pid)[0]
        except OSError:
            return False
        if state in "TtZX":
            return state in "Tt"
        time.sleep(0.001)
    return False


def gone(pid: int) -> bool:
    """`pid` has exited (a zombie not yet reaped counts as gone)."""
    try:
        return stat(pid)[0] == "Z"
    except OSError:
        return True
