"""The promotion history: who moved which alias of a registered model to which version, when and why.

It is kept on the registered model itself, in the tag `tabserve.promotions` (HISTORY_TAG): a JSON list of
entries, oldest first, bounded to the last HISTORY_LIMIT entries (and to what fits in one MLflow tag value).
Each entry: {"alias", "action" ("promote" | "rollback"), "version", "previous" (the version the alias
pointed at before, "" when it did not exist), "by", "reason", "at" (UTC, ISO 8601)}.

`walk()` replays one alias's entries into the versions a rollback steps back through; pure, tested by tables.

`record()` appends one entry. MLflow has no compare-and-swap on tags, so two promotions at once could each
write "what I read + my entry" and one entry would be lost. It re-reads the tag just before writing, writes,
waits SETTLE_SECONDS (far longer than one read-then-write takes) and reads again: when its entry is gone,
another writer overwrote it, and it appends again (at most WRITE_ATTEMPTS times). An entry the other writer
lost is that writer's to find the same way. (A writer whose own read-then-write took longer than the settle
time could still overwrite an entry unseen; record() says so in its result.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final

HISTORY_TAG: Final = "tabserve.promotions"
HISTORY_LIMIT: Final = 20
# MLflow 3 takes registered-model tag values up to 100,000 characters; older versions' database columns hold 5000.
TAG_VALUE_LIMIT: Final = 5000
REASON_LIMIT: Final = 300
SETTLE_SECONDS: Final = 1.0
WRITE_ATTEMPTS: Final = 5


@dataclass(frozen=True)
class Entry:
    alias: str
    action: str
    version: str
    previous: str
    by: str
    reason: str
    at: str

    @staticmethod
    def now(alias: str, action: str, version: str, previous: str, *, by: str, reason: str) -> Entry:
        at = datetime.now(UTC).isoformat(timespec="seconds")
        return Entry(alias, action, version, previous, by, reason[:REASON_LIMIT], at)


class HistoryUnreadable(ValueError):
    """The tag holds something that is not a promotion history (edited by hand?)."""


def parse(text: str | None) -> list[Entry]:
    if not text:
        return []
    try:
        raw = json.loads(text)
        return [Entry(**{key: str(item[key]) for key in Entry.__dataclass_fields__}) for item in raw]
    except (ValueError, TypeError, KeyError) as exc:
        raise HistoryUnreadable(f"the tag {HISTORY_TAG} is not a promotion history: {exc}") from None


def serialize(entries: list[Entry]) -> str:
    """The tag's value: the newest entries, at most HISTORY_LIMIT, that fit in one tag value."""
    kept = entries[-HISTORY_LIMIT:]
    while True:
        text = json.dumps([asdict(entry) for entry in kept], separators=(",", ":"))
        if len(text) <= TAG_VALUE_LIMIT or len(kept) <= 1:
            return text
        kept = kept[1:]


def walk(entries: list[Entry], alias: str) -> list[str]:
    """The versions `alias` went through, as a rollback sees them: the last one is where the tool last put it,
    each one before it is where a rollback goes next.

    A promotion pushes its version (starting afresh from its `previous` when that is not where the walk
    stood: the alias was moved outside the tool in between). A rollback pops the version it left; when it
    went somewhere else than the step below (an explicit `--to`), the walk is cut back to that version if it
    holds it, else restarts from it.
    """
    stack: list[str] = []
    for entry in (e for e in entries if e.alias == alias):
        if entry.action == "promote":
            if not stack or stack[-1] != entry.previous:
                stack = [entry.previous] if entry.previous else []
            stack.append(entry.version)
            continue
        if stack and stack[-1] == entry.previous:
            stack.pop()
        if not stack or stack[-1] != entry.version:
            stack = stack[: len(stack) - stack[::-1].index(entry.version)] if entry.version in stack \
                else [entry.version]
    return stack


def describe(entry: Entry) -> str:
    return (f"{entry.at} {entry.action} {entry.alias}: {entry.previous or '(none)'} -> {entry.version} by "
            f"{entry.by}: {entry.reason}")


def as_json(entries: list[Entry]) -> list[dict[str, Any]]:
    return [asdict(entry) for entry in entries]


class HistoryConflict(RuntimeError):
    """Concurrent writers kept overwriting the entry: it is not in the history (the alias was moved)."""


@dataclass(frozen=True)
class Recorded:
    entries: list[Entry]  # the history as read back after the write
    attempts: int  # 1 unless a concurrent writer overwrote the entry
    slow_write: bool  # the read-then-write took longer than the settle time (see the module docstring)


def record(read: Callable[[], str | None], write: Callable[[str], None], entry: Entry,
           settle_seconds: float = SETTLE_SECONDS) -> Recorded:
    """Append `entry` to the history that `read()` returns and `write(text)` stores, detecting an entry lost to a
    concurrent writer and appending again (see the module docstring)."""
    slow = False
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        started = time.monotonic()
        write(serialize([*parse(read()), entry]))
        slow = slow or time.monotonic() - started > settle_seconds
        time.sleep(settle_seconds)
        after = parse(read())
        if entry in after:
            return Recorded(after, attempt, slow)
    raise HistoryConflict(f"the entry could not be kept in {HISTORY_TAG} after {WRITE_ATTEMPTS} attempts: "
                          "other promotions kept overwriting it")
