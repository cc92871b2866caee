"""`tabserve-admin decisions`: the auditor's commands on decision log files; `verify` lives here.

Further sub-commands plug in as modules named in `SUBCOMMANDS`, each with `register(subcommands)` adding its
parser (with `set_defaults(handler=...)`) to this group's sub-parsers, as cli.py's groups do one level up.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from tabserve_admin.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from tabserve_common.secrets import read_secret
from tabserve_common.settings import SettingsError
from tabserve_server.decisions.verify import Report, Unreadable, verify_directory

# Modules of this package adding sub-commands to `decisions` (e.g. replay).
SUBCOMMANDS: Final[tuple[str, ...]] = ("decisions_replay",)


def register(commands: Any) -> None:
    group = commands.add_parser("decisions", help="verify (and replay) decision log files",
                                description="Commands on the server's decision log directory.")
    subcommands = group.add_subparsers(dest="decisions_command", metavar="COMMAND", required=True)
    verify = subcommands.add_parser(
        "verify", help="check every file set's chain: intact, nothing missing",
        description="Check the hash chain of every worker's file set under DIR: exit 0 intact, 1 with the first "
        "bad record named and why, 2 when DIR cannot be read (or a keyed log is given no key).",
    )
    verify.add_argument("directory", metavar="DIR", type=Path, help="the server's decision_log_dir (or one worker's)")
    verify.add_argument("--key-file", default="", help="the server's decision_log_key_file (keyed logs)")
    verify.add_argument("--open-tail", action="store_true",
                        help="a copy of a running server's log: a set not ending in a close record is still being "
                        "written (a notice), not a truncated tail")
    verify.add_argument("--json", action="store_true", help="print the report as one JSON object")
    verify.set_defaults(handler=run_verify)
    for name in SUBCOMMANDS:
        importlib.import_module(f"tabserve_admin.{name}").register(subcommands)


def key_from_file(path: str) -> bytes | None:
    """The chain key from `path` (None when empty), read as the server reads it; raises SettingsError."""
    return read_secret("", path, "decision log key").encode() if path else None


def run_verify(args: argparse.Namespace) -> int:
    try:
        report = verify_directory(args.directory, key_from_file(args.key_file), open_tail=args.open_tail)
    except (Unreadable, SettingsError) as exc:
        print(f"tabserve-admin decisions verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps({"intact": report.intact, "sets": [asdict(s) for s in report.sets]}, default=str))
    else:
        print(render(report))
    return EXIT_OK if report.intact else EXIT_FAILED


def render(report: Report) -> str:
    lines = []
    for s in report.sets:
        state = "live (being written)" if s.live else "closed"
        lines.append(f"{s.worker}: {s.files} file(s), {s.records} record(s) checked, {s.decisions} decision(s), "
                     f"{state}")
        if s.pruned:
            lines.append(f"  removed by retention (named in pruned records): {', '.join(s.pruned)}")
        lines.extend(f"  notice: {notice}" for notice in s.notices)
        lines.append(f"  FAILED at {s.problem}" if s.problem else "  chain intact")
    lines.append("intact" if report.intact else "NOT intact: see FAILED above")
    return "\n".join(lines)
