"""`tabserve-client`: score CSV / JSON-lines files, show the live model and check health from a shell.

Depends on the standard library, numpy and grpcio only (like the rest of tabserve_client).

Exit codes: 0 success, 1 the server failed the call (or health is not SERVING), 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import grpc
import numpy as np

from tabserve_client.client import ModelInfo, ScoreBatch, ScoringClient, ScoringError

DEFAULT_TARGET: Final = "localhost:50051"
TARGET_ENV: Final = "TABSERVE_TARGET"
DEFAULT_TIMEOUT_S: Final = 10.0
DEFAULT_ID_COLUMN: Final = "applicant_id"
DEFAULT_BATCH_SIZE: Final = 1000
JSONL_SUFFIXES: Final = (".jsonl", ".ndjson")
# CSV cells (compared after strip() and lower()) that mean "missing".
MISSING_TOKENS: Final = frozenset({"", "na", "nan"})
OUTPUT_FIELDS: Final = ("score", "decision", "threshold", "model_name", "model_version")
_SHOWN_NAMES: Final = 8
_ROW_IN_DETAILS: Final = re.compile(r"\brow (\d+)\b")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


class CliError(Exception):
    """A problem with the user's input or arguments: printed as `error: <message>`, exit code 2."""


class CannotReadError(CliError):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot read {name}: {reason}")


# --- input ----------------------------------------------------------------------------------------


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


def _quote_list(names: Sequence[str]) -> str:
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
        problems.append(f"unknown column{'s' if len(unknown) > 1 else ''} {_quote_list(unknown)}")
    if missing:
        problems.append(f"missing column{'s' if len(missing) > 1 else ''} {_quote_list(missing)}")
    hint = ""
    if unknown and id_column and id_column not in present:
        hint = f" (the id column is {id_column!r}, see --id-column)"
    return (
        f"{where}the columns do not match the {len(features)} features of "
        f"{info.name} version {info.version}: " + "; ".join(problems) + hint
    )


def _not_a_number(line: int, column: str, shown: str) -> CliError:
    return CliError(f"line {line}, column {column!r}: {shown} is not a number")


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


def _read_csv(
    stream: IO[str], name: str, client: ScoringClient, args: argparse.Namespace
) -> tuple[ParsedInput, ModelInfo]:
    reader = csv.reader(stream)
    try:
        try:
            header = [c.strip() for c in next(reader)]
        except StopIteration:
            raise CannotReadError(name, "the file is empty (expected a header line of column names)") from None
        seen: set[str] = set()
        for column in header:
            if column in seen:
                raise CliError(f"line 1: column {column!r} appears more than once")
            seen.add(column)
        info = client.model_info()
        mismatch = _column_mismatch(header, info, args.id_column)
        if mismatch:
            raise CliError(mismatch)
        features = info.feature_names
        positions = [header.index(f) for f in features]
        id_position = header.index(args.id_column) if args.id_column in seen else None
        parsed = ParsedInput(len(features), args.batch_size, has_ids=id_position is not None)
        width = len(header)
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num
            if not row:  # blank line
                continue
            if len(row) != width:
                raise CliError(f"line {start}: {len(row)} fields, the header has {width}")
            values = [_parse_text(row[p], start, f) for p, f in zip(positions, features, strict=True)]
            parsed.add(values, start, row[id_position] if id_position is not None else None)
    except csv.Error as exc:
        raise CannotReadError(name, f"line {reader.line_num}: {exc}") from None
    parsed.finish()
    return parsed, info


def _read_jsonl(
    stream: IO[str], name: str, client: ScoringClient, args: argparse.Namespace
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
            info = client.model_info()
            features = info.feature_names
            allowed = {*features, args.id_column}
            parsed = ParsedInput(len(features), args.batch_size, has_ids=args.id_column in obj)
        if not allowed.issuperset(obj) or any(f not in obj for f in features):
            raise CliError(_column_mismatch(list(obj), info, args.id_column, where=f"line {line}: ") or "")
        if (args.id_column in obj) != parsed.has_ids:
            raise CliError(f"line {line}: the id column {args.id_column!r} must be in every line or in none")
        values = [_parse_json_value(obj[f], line, f) for f in features]
        parsed.add(values, line, obj.get(args.id_column))
    if info is None or parsed is None:  # no rows at all
        info = client.model_info()
        parsed = ParsedInput(len(info.feature_names), args.batch_size)
    parsed.finish()
    return parsed, info


def _input_format(args: argparse.Namespace) -> str:
    if args.input_format:
        return str(args.input_format)
    if args.file in (None, "-"):
        return "csv"
    return "jsonl" if Path(args.file).suffix.lower() in JSONL_SUFFIXES else "csv"


def _read_input(client: ScoringClient, args: argparse.Namespace) -> tuple[ParsedInput, ModelInfo]:
    fmt = _input_format(args)
    reader = _read_jsonl if fmt == "jsonl" else _read_csv
    if args.file in (None, "-"):
        name = "<stdin>"
        buffer = getattr(sys.stdin, "buffer", None)
        # Decode the bytes ourselves: the locale's encoding of sys.stdin may not be UTF-8.
        wrapper = None if buffer is None else io.TextIOWrapper(buffer, encoding="utf-8-sig", newline="")
        try:
            return reader(sys.stdin if wrapper is None else wrapper, name, client, args)
        except (UnicodeDecodeError, OSError) as exc:
            raise CannotReadError(name, _reason(exc)) from None
        finally:
            if wrapper is not None:
                wrapper.detach()  # do not close the process's stdin
    name = str(args.file)
    try:
        with open(args.file, encoding="utf-8-sig", newline="") as fh:
            return reader(fh, name, client, args)
    except (UnicodeDecodeError, OSError) as exc:
        raise CannotReadError(name, _reason(exc)) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at offset {exc.start})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


# --- scoring and output ---------------------------------------------------------------------------


def _with_offset(details: str, offset: int, lines: Sequence[int]) -> str:
    """The server names rows of one request; turn them into rows of the whole input and its lines."""

    def replace(match: re.Match[str]) -> str:
        row = offset + int(match.group(1))
        where = f" (line {lines[row]})" if 0 <= row < len(lines) else ""
        return f"row {row}{where}"

    return _ROW_IN_DETAILS.sub(replace, details)


def _score_all(client: ScoringClient, parsed: ParsedInput, info: ModelInfo) -> list[ScoreBatch]:
    """Score every batch; the matrices are in `info`'s feature order, so a version swap mid-run is checked."""
    results = []
    offset = 0
    known = {(info.name, info.version)}
    for matrix in parsed.batches:
        try:
            batch = client.score(matrix)
        except ScoringError as exc:
            raise ScoringError(exc.code, _with_offset(exc.details, offset, parsed.lines)) from None
        if len(batch) != matrix.shape[0]:
            raise ScoringError(
                grpc.StatusCode.INTERNAL,
                f"asked for {matrix.shape[0]} scores, the server returned {len(batch)}",
            )
        if (batch.model_name, batch.model_version) not in known:
            # Matrices carry no column names: make sure the new version reads them in the same order.
            current = client.model_info()
            if current.feature_names != info.feature_names:
                raise ScoringError(
                    grpc.StatusCode.ABORTED,
                    f"the server switched from {info.name} version {info.version} to {current.name} version "
                    f"{current.version} with different features during scoring; run the command again",
                )
            known.add((batch.model_name, batch.model_version))
        results.append(batch)
        offset += matrix.shape[0]
    return results


def _output_rows(parsed: ParsedInput, results: Sequence[ScoreBatch]) -> Iterator[tuple[Any, float, bool, ScoreBatch]]:
    index = 0
    for batch in results:
        for score, decision in zip(batch.scores.tolist(), batch.decisions.tolist(), strict=True):
            yield (parsed.ids[index] if parsed.has_ids else None), float(score), bool(decision), batch
            index += 1


def _write_output(out: IO[str], fmt: str, id_column: str, parsed: ParsedInput, results: Sequence[ScoreBatch]) -> None:
    if fmt == "jsonl":
        for row_id, score, decision, batch in _output_rows(parsed, results):
            record: dict[str, Any] = {id_column: row_id} if parsed.has_ids else {}
            record.update(
                score=score,
                decision=decision,
                threshold=batch.threshold,
                model_name=batch.model_name,
                model_version=batch.model_version,
            )
            out.write(json.dumps(record) + "\n")
        return
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([id_column, *OUTPUT_FIELDS] if parsed.has_ids else OUTPUT_FIELDS)
    for row_id, score, decision, batch in _output_rows(parsed, results):
        cells = [
            repr(score),
            "true" if decision else "false",
            repr(batch.threshold),
            batch.model_name,
            batch.model_version,
        ]
        if parsed.has_ids:
            cells.insert(0, row_id if isinstance(row_id, str) else json.dumps(row_id))
        writer.writerow(cells)


def _cmd_score(client: ScoringClient, args: argparse.Namespace) -> int:
    parsed, info = _read_input(client, args)
    results = _score_all(client, parsed, info)
    if args.output in (None, "-"):
        _write_output(sys.stdout, args.output_format, args.id_column, parsed, results)
        sys.stdout.flush()
    else:
        try:
            with open(args.output, "w", encoding="utf-8", newline="") as out:
                _write_output(out, args.output_format, args.id_column, parsed, results)
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {_reason(exc)}") from None
    versions = sorted({b.model_version for b in results} or {info.version}, key=lambda v: (len(v), v))
    names = sorted({b.model_name for b in results} or {info.name})
    noun = "version" if len(versions) == 1 else "versions"
    rows = "row" if parsed.num_rows == 1 else "rows"
    model = f"{', '.join(names)} {noun} {', '.join(versions)}"
    print(f"scored {parsed.num_rows} {rows} with {model}", file=sys.stderr)
    return EXIT_OK


# --- info and health ------------------------------------------------------------------------------


def _info_dict(info: ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "run_id": info.run_id,
        "requested_uri": info.requested_uri,
        "source_uri": info.source_uri,
        "loaded_from": info.loaded_from,
        "loaded_at": info.loaded_at.isoformat(),
        "load_duration_seconds": info.load_duration_seconds,
        "flavor": info.flavor,
        "threshold": info.threshold,
        "threshold_source": info.threshold_source,
        "features": [{"name": f.name, "type": f.type} for f in info.features],
    }


def _cmd_info(client: ScoringClient, args: argparse.Namespace) -> int:
    info = client.model_info()
    if args.json:
        print(json.dumps(_info_dict(info), indent=2))
        return EXIT_OK
    names = info.feature_names
    loaded_at = info.loaded_at.isoformat()
    first = ", ".join(names[:_SHOWN_NAMES]) + (", ..." if len(names) > _SHOWN_NAMES else "")
    rows = [
        ("model", info.name),
        ("version", info.version),
        ("run id", info.run_id or "-"),
        ("requested", info.requested_uri),
        ("source", info.source_uri),
        ("loaded from", f"{info.loaded_from} at {loaded_at} in {info.load_duration_seconds:.2f}s"),
        ("flavor", info.flavor),
        ("threshold", f"{info.threshold!r} ({info.threshold_source or 'unknown source'})"),
        ("features", f"{len(names)}: {first}"),
    ]
    width = max(len(label) for label, _ in rows) + 1
    for label, value in rows:
        print(f"{label + ':':<{width}} {value}")
    return EXIT_OK


def _cmd_health(client: ScoringClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


# --- arguments ------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        help=f"host:port of the scoring server (default: ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    common.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT_S,
        help=f"deadline of each call in seconds (default: {DEFAULT_TIMEOUT_S:g})",
    )
    parser = argparse.ArgumentParser(
        prog="tabserve-client", description="Command-line client of a tabserve scoring server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = commands.add_parser(
        "score",
        parents=[common],
        help="score the rows of a CSV or JSON-lines file",
        description=(
            "Score rows from a CSV or JSON-lines file (or stdin). Columns must be the model's features, plus "
            "an optional id column that is copied to the output. Empty, NA and nan cells (null in JSON) mean "
            "missing."
        ),
    )
    score.add_argument("file", nargs="?", metavar="FILE", help="input file; '-' or absent for stdin")
    score.add_argument(
        "--input-format",
        choices=("csv", "jsonl"),
        help="default: from the extension (.jsonl/.ndjson are JSON lines, else CSV); CSV for stdin",
    )
    score.add_argument(
        "--id-column",
        default=DEFAULT_ID_COLUMN,
        metavar="NAME",
        help=f"column copied to the output instead of being sent as a feature (default: {DEFAULT_ID_COLUMN})",
    )
    score.add_argument("--output", "-o", metavar="FILE", help="output file (default: stdout)")
    score.add_argument("--output-format", choices=("csv", "jsonl"), default="csv", help="default: csv")
    score.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"rows per request (default: {DEFAULT_BATCH_SIZE})",
    )
    score.set_defaults(handler=_cmd_score)

    info = commands.add_parser("info", parents=[common], help="show the live model version")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(handler=_cmd_info)

    health = commands.add_parser(
        "health", parents=[common], help="grpc.health.v1 status (exit 0 when SERVING, 1 otherwise)"
    )
    health.add_argument("--service", default="", help="service name ('' is the whole server)")
    health.set_defaults(handler=_cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with ScoringClient(args.target, timeout=args.timeout) as client:
            code: int = args.handler(client, args)
            return code
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ScoringError as exc:
        print(f"error: {exc.code.name}: {exc.details or 'no details'}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # e.g. piped into `head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # no second error at interpreter exit
        except OSError:
            pass
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
