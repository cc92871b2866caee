"""Input reading of the `tabserve-client score` command: CSV and JSON-lines rows checked against the model.

`read_rows` reads a file (or stdin) into float64 matrices in the model's feature order, with the id
column and line number of every row. Every problem with the input is an `InputError` whose message names
the line and the column; the CLI prints it and exits 2. Depends on the standard library and numpy only.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import numpy as np

from tabserve_client.client import ModelInfo

__all__ = ["INPUT_FORMATS", "MISSING_TOKENS", "InputError", "ParsedInput", "error_reason", "read_rows"]

INPUT_FORMATS: Final = ("csv", "jsonl")
JSONL_SUFFIXES: Final = (".jsonl", ".ndjson")
# CSV cells (compared after strip() and lower()) that mean "missing".
MISSING_TOKENS: Final = frozenset({"", "na", "nan"})
_SHOWN_NAMES: Final = 8

ModelInfoSource = Callable[[], ModelInfo]


class InputError(Exception):
    """A problem with the user's input or arguments: the CLI prints `error: <message>` and exits 2."""


class CannotReadError(InputError):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot read {name}: {reason}")


@dataclass
class ParsedInput:
    """Rows read from the input: feature matrices in the model's order, ids and line numbers."""

    num_features: int
    batch_size: int
    batches: list[np.ndarray] = field(default_factory=list)
    ids: list[Any] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    has_ids: bool = False
    _current: np.ndarray | None = None
    _filled: int = 0

    def add(self, values: Sequence[float], line: int, row_id: Any = None) -> None:
        if self._current is None:
            self._current = np.empty((self.batch_size, self.num_features), dtype=np.float64)
        self._current[self._filled] = values
        self._filled += 1
        self.lines.append(line)
        if self.has_ids:
            self.ids.append(row_id)
        if self._filled == self.batch_size:
            self.finish()

    def finish(self) -> None:
        if self._current is not None and self._filled:
            self.batches.append(self._current[: self._filled])
        self._current = None
        self._filled = 0

    @property
    def num_rows(self) -> int:
        return len(self.lines)


def quote_list(names: Sequence[str]) -> str:
    """`'a', 'b', ...` with at most a few names shown."""
    shown = ", ".join(repr(n) for n in names[:_SHOWN_NAMES])
    if len(names) > _SHOWN_NAMES:
        shown += f" (and {len(names) - _SHOWN_NAMES} more)"
    return shown


def _column_mismatch(columns: Sequence[str], info: ModelInfo, id_column: str, where: str = "") -> str | None:
    """A message naming the unknown and missing columns, or None when the columns fit the model."""
    features = info.feature_names
    feature_set = set(features)
    present = set(columns)
    unknown = [c for c in columns if c not in feature_set and c != id_column]
    missing = [f for f in features if f not in present]
    if not unknown and not missing:
        return None
    problems = []
    if unknown:
        problems.append(f"unknown column{'s' if len(unknown) > 1 else ''} {quote_list(unknown)}")
    if missing:
        problems.append(f"missing column{'s' if len(missing) > 1 else ''} {quote_list(missing)}")
    hint = ""
    if unknown and id_column and id_column not in present:
        hint = f" (the id column is {id_column!r}, see --id-column)"
    return (
        f"{where}the columns do not match the {len(features)} features of "
        f"{info.name} version {info.version}: " + "; ".join(problems) + hint
    )


def _not_a_number(line: int, column: str, shown: str) -> InputError:
    return InputError(f"line {line}, column {column!r}: {shown} is not a number")


def _parse_text(text: str, line: int, column: str) -> float:
    cleaned = text.strip()
    if cleaned.lower() in MISSING_TOKENS:
        return math.nan
    if "_" not in cleaned:  # float() accepts "1_000", which is not a number in a data file
        try:
            return float(cleaned)
        except ValueError:
            pass
    raise _not_a_number(line, column, repr(text))


def _parse_json_value(value: Any, line: int, column: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            raise _not_a_number(line, column, str(value)) from None
    if isinstance(value, str):
        return _parse_text(value, line, column)
    raise _not_a_number(line, column, json.dumps(value))


def _csv_header(reader: Any, name: str) -> list[str]:
    try:
        header = [c.strip() for c in next(reader)]
    except StopIteration:
        raise CannotReadError(name, "the file is empty (expected a header line of column names)") from None
    seen: set[str] = set()
    for column in header:
        if column in seen:
            raise InputError(f"line 1: column {column!r} appears more than once")
        seen.add(column)
    return header


def _read_csv(
    stream: IO[str], name: str, model_info: ModelInfoSource, id_column: str, batch_size: int
) -> tuple[ParsedInput, ModelInfo]:
    reader = csv.reader(stream)
    try:
        header = _csv_header(reader, name)
        info = model_info()
        mismatch = _column_mismatch(header, info, id_column)
        if mismatch:
            raise InputError(mismatch)
        features = info.feature_names
        positions = [header.index(f) for f in features]
        id_position = header.index(id_column) if id_column in header else None
        parsed = ParsedInput(len(features), batch_size, has_ids=id_position is not None)
        width = len(header)
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num
            if not row:  # blank line
                continue
            if len(row) != width:
                raise InputError(f"line {start}: {len(row)} fields, the header has {width}")
            values = [_parse_text(row[p], start, f) for p, f in zip(positions, features, strict=True)]
            parsed.add(values, start, row[id_position] if id_position is not None else None)
    except csv.Error as exc:
        raise CannotReadError(name, f"line {reader.line_num}: {exc}") from None
    parsed.finish()
    return parsed, info


def _read_jsonl(
    stream: IO[str], name: str, model_info: ModelInfoSource, id_column: str, batch_size: int
) -> tuple[ParsedInput, ModelInfo]:
    info: ModelInfo | None = None
    parsed: ParsedInput | None = None
    features: tuple[str, ...] = ()
    allowed: set[str] = set()
    for line, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CannotReadError(name, f"line {line}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise CannotReadError(name, f"line {line}: expected a JSON object, got {type(obj).__name__}")
        if info is None or parsed is None:
            info = model_info()
            features = info.feature_names
            allowed = {*features, id_column}
            parsed = ParsedInput(len(features), batch_size, has_ids=id_column in obj)
        if not allowed.issuperset(obj) or any(f not in obj for f in features):
            raise InputError(_column_mismatch(list(obj), info, id_column, where=f"line {line}: ") or "")
        if (id_column in obj) != parsed.has_ids:
            raise InputError(f"line {line}: the id column {id_column!r} must be in every line or in none")
        values = [_parse_json_value(obj[f], line, f) for f in features]
        parsed.add(values, line, obj.get(id_column))
    if info is None or parsed is None:  # no rows at all
        info = model_info()
        parsed = ParsedInput(len(info.feature_names), batch_size)
    parsed.finish()
    return parsed, info


def input_format(file: str | None, explicit: str | None) -> str:
    """`explicit`, else from the file's extension (.jsonl / .ndjson are JSON lines), else CSV (also for stdin)."""
    if explicit:
        return explicit
    if file in (None, "-"):
        return "csv"
    return "jsonl" if Path(file).suffix.lower() in JSONL_SUFFIXES else "csv"


def read_rows(
    file: str | None,
    *,
    model_info: ModelInfoSource,
    id_column: str,
    batch_size: int,
    fmt: str | None = None,
) -> tuple[ParsedInput, ModelInfo]:
    """Read `file` ('-' or None: stdin) and check its columns against the model `model_info()` returns.

    `model_info` is called once, after the header (or first JSON line) was read, so an unreadable file
    fails before any call to the server. Raises InputError naming the line and column of a problem.
    """
    reader = _read_jsonl if input_format(file, fmt) == "jsonl" else _read_csv
    if file in (None, "-"):
        name = "<stdin>"
        buffer = getattr(sys.stdin, "buffer", None)
        # Decode the bytes ourselves: the locale's encoding of sys.stdin may not be UTF-8.
        wrapper = None if buffer is None else io.TextIOWrapper(buffer, encoding="utf-8-sig", newline="")
        try:
            return reader(sys.stdin if wrapper is None else wrapper, name, model_info, id_column, batch_size)
        except (UnicodeDecodeError, OSError) as exc:
            raise CannotReadError(name, error_reason(exc)) from None
        finally:
            if wrapper is not None:
                wrapper.detach()  # do not close the process's stdin
    try:
        with open(file, encoding="utf-8-sig", newline="") as fh:
            return reader(fh, file, model_info, id_column, batch_size)
    except (UnicodeDecodeError, OSError) as exc:
        raise CannotReadError(file, error_reason(exc)) from None


def error_reason(exc: BaseException) -> str:
    """A short reason for a failed read or write: the OS's words, or where the bytes are not UTF-8."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at offset {exc.start})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
