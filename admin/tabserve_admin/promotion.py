"""`tabserve-admin promote` and `rollback`: move an alias only to a version the server would load, and record it.

Both verify the version first exactly as the server would load it (verification.py: download, the
out-of-process verifier, digest, threshold, labels, warm-up, and the feature schema against the version the
alias points at now), under the server's own settings (server_config.py), and refuse with the reason when it
would fail. Then they move the alias and append who, why and when to the promotion history on the
registered model (history.py). `rollback` steps back through that history; when the alias was moved outside
the tool since the last recorded move, it says so and asks for `--to VERSION` instead of guessing.
"""

from __future__ import annotations

import argparse
import getpass
import os
from typing import Any

from tabserve_admin import cli
from tabserve_admin.history import HISTORY_TAG, Entry, HistoryConflict, HistoryUnreadable, describe, parse, record, walk
from tabserve_admin.server_config import add_registry_options, complain, registry_client, say, server_settings
from tabserve_admin.verification import Loaded, ModelLoadError, VersionGate
from tabserve_common.settings import SettingsError
from tabserve_monitor.registry import Problem, RegistryError, RegistryWatcher


class Refused(Exception):
    """The move is not made; the message says why."""


def register(commands: Any) -> None:
    promote = commands.add_parser(
        "promote", help="point an alias at a version, after verifying it as the server would load it",
        description="Verify NAME/VERSION as the server would load it (its settings: TABSERVE_SERVER_* and "
                    "--server-flags), refuse with the reason if it would fail, else move the alias and record "
                    f"who and why in the registered model's tag {HISTORY_TAG}.",
    )
    promote.add_argument("name", help="registered model")
    promote.add_argument("version", help="the version to promote")
    _common(promote)
    promote.set_defaults(handler=run_promote)
    rollback = commands.add_parser(
        "rollback", help="move an alias back one step in its promotion history (verified the same way)",
        description="Move the alias back to where it was before the last move recorded by tabserve-admin. When "
                    "the alias was moved outside the tool since, nothing is guessed: give --to VERSION.",
    )
    rollback.add_argument("name", help="registered model")
    rollback.add_argument("--to", default="", metavar="VERSION", help="roll back to this version explicitly")
    _common(rollback)
    rollback.set_defaults(handler=run_rollback)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alias", default="production", help="the alias to move (default production)")
    parser.add_argument("--reason", required=True, help="why: recorded in the promotion history")
    parser.add_argument("--by", default="", help="who: recorded in the history (default: the environment's user)")
    add_registry_options(parser)


def run_promote(args: argparse.Namespace) -> int:
    return _guarded(args, lambda session: session.move(args.version, "promote"))


def run_rollback(args: argparse.Namespace) -> int:
    return _guarded(args, lambda session: session.move(args.to or session.rollback_target(), "rollback"))


def _guarded(args: argparse.Namespace, act: Any) -> int:
    try:
        settings = server_settings(args)
    except SettingsError as exc:
        complain(str(exc))
        return cli.EXIT_USAGE
    try:
        with VersionGate(settings) as gate:
            act(_Session(args, gate, registry_client(settings)))
    except (Refused, RegistryError, HistoryUnreadable) as exc:
        complain(str(exc))
        return cli.EXIT_FAILED
    return cli.EXIT_OK


def _user() -> str:
    """Who runs the command, from the environment (LOGNAME, USER, ...) or the password database."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container user with neither a variable nor a passwd entry
        return f"uid {os.getuid()}"


class _Session:
    """One promote or rollback: the alias as it is now, the history, the verification, the move."""

    def __init__(self, args: argparse.Namespace, gate: VersionGate, client: Any) -> None:
        self.name: str = args.name
        self.alias: str = args.alias
        self.by: str = args.by or _user()
        self.reason: str = args.reason
        self.gate = gate
        self.client = client
        self.watcher = RegistryWatcher(gate.settings.tracking_uri, self.name, alias=self.alias, client=client)
        resolution = self.watcher.resolve()
        if resolution.problem is Problem.MODEL_MISSING:
            raise Refused(f"refused: {resolution.detail}")
        self.current = resolution.target.version if resolution.target else ""
        self.entries = parse(self._history_text())

    def _history_text(self) -> str | None:
        registered = self.watcher.registered_model()
        return (getattr(registered, "tags", None) or {}).get(HISTORY_TAG)

    def rollback_target(self) -> str:
        steps = walk(self.entries, self.alias)
        if not steps:
            raise Refused(f"refused: no move of alias {self.alias!r} of {self.name} is recorded in {HISTORY_TAG}; "
                          "give the version to roll back to with --to VERSION")
        if steps[-1] != self.current:
            raise Refused(
                f"refused: alias {self.alias!r} of {self.name} points at version {self.current or '(none)'}, but the "
                f"last move recorded by tabserve-admin put it at version {steps[-1]}: it was moved outside the tool "
                "since, so the step back is unknown; give the version to roll back to with --to VERSION"
            )
        if len(steps) < 2:
            raise Refused(f"refused: the history of alias {self.alias!r} of {self.name} holds no version before "
                          f"{self.current}; give the version to roll back to with --to VERSION")
        return steps[-2]

    def move(self, version: str, action: str) -> None:
        if version == self.current:
            say(f"alias {self.alias} of {self.name} already points at version {version}: nothing to do")
            return
        loaded = self._verified(version)
        self.client.set_registered_model_alias(self.name, self.alias, version)
        entry = Entry.now(self.alias, action, version, self.current, by=self.by, reason=self.reason)
        verb = "promoted" if action == "promote" else "rolled back"
        say(f"{verb}: alias {self.alias} of {self.name} -> version {version} (was {self.current or 'unset'})")
        say(f"verified as the server would load it: {loaded.summary()}")
        # Re-read at write time, not the history read before the verification: another promotion may have
        # recorded its move meanwhile (history.record detects and retries a lost write).
        try:
            recorded = record(self._history_text,
                              lambda text: self.client.set_registered_model_tag(self.name, HISTORY_TAG, text), entry)
        except HistoryConflict as exc:
            raise Refused(f"the alias was moved, but {exc}; record it by hand") from None
        say(f"recorded in {HISTORY_TAG}: {describe(entry)}")
        if recorded.attempts > 1:
            say(f"note: a concurrent promotion overwrote the entry; written again (attempt {recorded.attempts})")
        if recorded.slow_write:
            say(f"note: writing {HISTORY_TAG} took longer than the settle time: a concurrent promotion's entry "
                "may be lost; check the history")

    def _verified(self, version: str) -> Loaded:
        """`version` loaded and validated against the alias's version now; Refused with the server's reason."""
        try:
            loaded = self.gate.load(self.name, version)
        except ModelLoadError as exc:
            raise Refused(f"refused: {self.name} version {version} would fail to load on the server: {exc}") from None
        current = None
        if self.current:
            try:
                current = self.gate.load(self.name, self.current)
            except ModelLoadError as exc:
                say(f"note: version {self.current}, where alias {self.alias} points now, does not load itself "
                    f"({exc}); the feature schema is not compared with it")
        try:
            self.gate.check(loaded, current)
        except ModelLoadError as exc:
            raise Refused(f"refused: the server would not swap in {self.name} version {version} for version "
                          f"{self.current}, where alias {self.alias} points now: {exc}") from None
        return loaded
