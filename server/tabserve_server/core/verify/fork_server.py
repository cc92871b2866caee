"""The verifier zygote: `python -m tabserve_server.core.verify.fork_server [--lean]`, one per serving process.

It imports once what a verification needs (lightgbm, numpy, the checks: most of a fresh verifier's start-up),
then forks a fresh child per request, which runs the verifier's own `main` (__main__.py) on one artifact and
exits: every artifact is still parsed in a disposable process, while the import is paid once, before any
reload. The zygote itself never reads model bytes, and never runs LightGBM (no OpenMP pool to fork).

Its protocol (zygote.py speaks the other side): one JSON object per line.
  zygote -> {"ready": PID}                          once its imports are done
  caller -> {"argv": [...], "nice": N}              the verifier's arguments, and the niceness the child adds
  zygote -> {"pid": CHILD}                          right after the fork (the caller kills it on its time limit)
  zygote -> {"pid": CHILD, "code": C, "output": S}  when it ended: C as Popen.returncode (-N: signal N),
                                                    S the tail of what it wrote on stdout and stderr
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any, NoReturn

from tabserve_server.core.verify import lifeline
from tabserve_server.core.verify.check import LIGHTGBM_OPTIONAL
from tabserve_server.core.verify.process import lower_priority

OUTPUT_TAIL = 64 * 1024  # the verdict and the last words are at the end
CHILD_NAME = "tabserve-verify"  # /proc/PID/comm of a forked verifier once armed (its command line is the zygote's)


def _prepare(lean: bool) -> None:
    """Import what every verification imports, so a child starts with it in memory."""
    if lean:  # as check(lean=True) does in a fresh verifier: a LightGBM text model needs none of them
        for name in LIGHTGBM_OPTIONAL:
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None makes `import name` fail
    import lightgbm  # noqa: F401
    import yaml  # type: ignore[import-untyped]  # noqa: F401  # MLmodel

    import tabserve_server.core.verify.__main__  # noqa: F401  # the checks, the artifact reader, numpy


def _reply(message: dict[str, Any]) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def _child(request: dict[str, Any], output: int, zygote: int) -> NoReturn:
    code = 70
    try:
        lifeline.arm(zygote)  # first: the zygote dies with the server, so the child dies with either
        lifeline.name(CHILD_NAME)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the zygote's requests
        from tabserve_server.core.verify.__main__ import main

        code = main([str(arg) for arg in request["argv"]])
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)  # never the zygote's exit handlers, never back into its loop


def _own_group(pid: int) -> None:
    """Put the child in a process group of its own, from outside (so even a child stopped before its first step).

    A child stopped (SIGSTOP) before `lifeline.arm` has no parent-death signal, and once the zygote is gone nothing
    of ours can end it. In a group of its own within the zygote's session, the zygote's death orphans that group,
    and the kernel sends an orphaned group with a stopped member SIGHUP then SIGCONT: the child dies of the hang-up,
    or resumes into `arm`, whose parent check ends it. (In the zygote's own group it would not be orphaned: the
    zygote leads a session of its own, so no member's parent is in the same session.)"""
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # already ended (the zygote reports it as usual)


def _drain(fd: int) -> str:
    """Everything the child writes until it closes its end (it exits), keeping the tail."""
    tail = b""
    while chunk := os.read(fd, 65536):
        tail = (tail + chunk)[-OUTPUT_TAIL:]
    return tail.decode(errors="replace")


def serve(lean: bool) -> None:
    _prepare(lean)
    zygote = os.getpid()
    _reply({"ready": zygote})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _child(request, write_end, zygote)
        os.close(write_end)
        _own_group(pid)
        lower_priority(pid, int(request.get("nice", 0)))  # from outside, as for a spawned one: even if stopped
        _reply({"pid": pid})
        output = _drain(read_end)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        _reply({"pid": pid, "code": os.waitstatus_to_exitcode(status), "output": output})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tabserve_server.core.verify.fork_server",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--lean", action="store_true", help="skip lightgbm's optional imports (no pyfunc models)")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit at once unless this is still the parent")
    args = parser.parse_args(argv)
    lifeline.arm(args.parent_pid)  # again: armed before the exec by zygote.py
    serve(args.lean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
