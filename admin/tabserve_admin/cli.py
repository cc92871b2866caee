"""`tabserve-admin`: the command layout every admin command plugs into.

Each command group is a module of this package with one function, `register(commands)`, that adds its
sub-command (and that sub-command's own sub-commands) to the top-level parser's sub-parsers and sets
`handler` (a function of the parsed arguments returning the exit code) on each leaf parser. Adding a group
means adding its module's name to `GROUPS`; nothing else here changes.

Exit codes are shared by every command: 0 all good, 1 the thing checked is wrong (a broken chain, a
refused promotion, an unhealthy registry), 2 bad usage or an input that cannot be read.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

Handler = Callable[[argparse.Namespace], int]

# Modules of this package, each with `register(commands: argparse._SubParsersAction) -> None`.
GROUPS: Final[tuple[str, ...]] = ("decisions", "status", "promotion", "registry_check")


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree: one sub-command per group module."""
    parser = argparse.ArgumentParser(
        prog="tabserve-admin",
        description="Operator and auditor commands for tabserve.",
        epilog=f"exit codes: {EXIT_OK} ok, {EXIT_FAILED} what was checked is wrong, {EXIT_USAGE} bad usage",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in GROUPS:
        importlib.import_module(f"tabserve_admin.{name}").register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tabserve-admin`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:  # a group given without its sub-command
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return EXIT_USAGE
    return handler(args)
