"""The verifier process: `python -m tabserve_server.core.verify DIRECTORY [--label L] [--allow-pyfunc] ...`.

Its last line on stdout is `TABSERVE-VERDICT {json}`: {"ok": true, "digest": ...} or {"ok": false, "error":
...}, and it exits 0 either way. Any other end (a signal, an abort, no verdict) is judged by the caller
(process.py) as a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from tabserve_server.core.verify import lifeline
from tabserve_server.core.verify.check import check
from tabserve_server.core.verify.process import VERDICT_MARK
from tabserve_server.errors import ModelLoadError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tabserve_server.core.verify", description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--label", default="", help="names the model in messages (default: the directory)")
    parser.add_argument("--allow-pyfunc", action="store_true")
    parser.add_argument("--max-model-bytes", type=int, default=2**62)
    parser.add_argument("--compile-to", type=Path, help="also compile the model there (core/compiled.py)")
    parser.add_argument("--threshold", type=float, default=0.5, help="no compiled decision may flip at it")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit at once unless this is still the parent")
    args = parser.parse_args(argv)
    lifeline.arm(args.parent_pid)  # again: armed before the exec when started by process.py
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        checked = check(args.directory, args.label or str(args.directory), allow_pyfunc=args.allow_pyfunc,
                        max_model_bytes=args.max_model_bytes, lean=True)
        verdict: dict[str, object] = {"ok": True, **dataclasses.asdict(checked)}
        if args.compile_to:
            from tabserve_server.core.compiled import compile_directory

            verdict["compiled"] = compile_directory(args.directory, args.label or str(args.directory),
                                                    checked.digest, args.max_model_bytes, args.compile_to,
                                                    threshold=args.threshold)
    except ModelLoadError as exc:
        verdict = {"ok": False, "error": str(exc), "reason": exc.reason}
    sys.stdout.flush()
    print(VERDICT_MARK + json.dumps(verdict), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
