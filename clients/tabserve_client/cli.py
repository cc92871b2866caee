"""`tabserve-client`: the commands `score`, `info` and `health`, their arguments, output and exit codes.

Reading the input files (CSV, JSON lines, checking their columns) is in `tabserve_client.inputs`; writing the
scores (CSV, JSON lines) in `tabserve_client.outputs`.
Depends on the standard library, numpy and grpcio only (like the rest of tabserve_client).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, Final

import grpc

from tabserve_client import explain_output
from tabserve_client.cli_connection import add_connection_arguments, connection_arguments
from tabserve_client.client import ModelInfo, ScoreBatch, ScoringClient, ScoringError
from tabserve_client.explain_output import Explain
from tabserve_client.inputs import INPUT_FORMATS, InputError, ParsedInput, error_reason, read_rows
from tabserve_client.outputs import OUTPUT_FIELDS, write_scores

DEFAULT_TARGET: Final = "localhost:50051"
TARGET_ENV: Final = "TABSERVE_TARGET"
DEFAULT_TIMEOUT_S: Final = 10.0
DEFAULT_ID_COLUMN: Final = "applicant_id"
DEFAULT_BATCH_SIZE: Final = 1000
_FEATURES_SHOWN: Final = 8
_ROW_IN_DETAILS: Final = re.compile(r"\brow (\d+)\b")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
EXIT_CODES_HELP: Final = f"""exit codes:
  {EXIT_OK}    success (health: the service is SERVING)
  {EXIT_FAILED}    the server failed the call or could not be reached (the gRPC status is printed), or
       health is not SERVING, or the health service name is unknown
  {EXIT_USAGE}    bad arguments or bad input (file missing or unreadable, columns that do not match
       the model, a value that is not a number), a TLS file that cannot be read, or an output
       file that cannot be written
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""


# --- scoring and output ---------------------------------------------------------------------------


def _with_offset(details: str, offset: int, lines: Sequence[int]) -> str:
    """The server names rows of one request; turn them into rows of the whole input and its lines."""

    def replace(match: re.Match[str]) -> str:
        row = offset + int(match.group(1))
        where = f" (line {lines[row]})" if 0 <= row < len(lines) else ""
        return f"row {row}{where}"

    return _ROW_IN_DETAILS.sub(replace, details)


def _score_all(
    client: ScoringClient, parsed: ParsedInput, info: ModelInfo, explain: Explain | None = None
) -> tuple[list[ScoreBatch], dict[tuple[str, str], ModelInfo]]:
    """Score every batch; the matrices are in `info`'s feature order, so a version swap mid-run is checked.

    Returns the batches and the info of every version that answered (for its decision labels).
    """
    results = []
    offset = 0
    known = {(info.name, info.version): info}
    for matrix in parsed.batches:
        try:
            batch = client.score(matrix) if explain is None else client.score(
                matrix, explain=True, top_k=explain.top_k, explain_all_rows=explain.all_rows
            )
        except ScoringError as exc:
            raise ScoringError(exc.code, _with_offset(exc.details, offset, parsed.lines), exc.request_id) from None
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
            known[(batch.model_name, batch.model_version)] = current
        results.append(batch)
        offset += matrix.shape[0]
    return results, known


def _meaning(info: ModelInfo) -> str:
    """What `decision` means for this version, in its own words."""
    return (
        f"decision=true ({info.positive_label}) means score >= {info.threshold!r}; "
        f"false means {info.negative_label}"
    )


def _cmd_score(client: ScoringClient, args: argparse.Namespace) -> int:
    parsed, info = read_rows(
        args.file,
        model_info=client.model_info,
        id_column=args.id_column,
        batch_size=args.batch_size,
        fmt=args.input_format,
    )
    explain = explain_output.explain_from_arguments(args)
    results, infos = _score_all(client, parsed, info, explain)
    if args.output in (None, "-"):
        write_scores(sys.stdout, args.output_format, args.id_column, parsed, results, infos=infos, explain=explain)
        sys.stdout.flush()
    else:
        try:
            with open(args.output, "w", encoding="utf-8", newline="") as out:
                write_scores(out, args.output_format, args.id_column, parsed, results, infos=infos,
                              explain=explain)
        except OSError as exc:
            raise InputError(f"cannot write {args.output}: {error_reason(exc)}") from None
    versions = sorted({b.model_version for b in results} or {info.version}, key=lambda v: (len(v), v))
    names = sorted({b.model_name for b in results} or {info.name})
    noun = "version" if len(versions) == 1 else "versions"
    rows = "row" if parsed.num_rows == 1 else "rows"
    model = f"{', '.join(names)} {noun} {', '.join(versions)}"
    print(f"scored {parsed.num_rows} {rows} with {model}", file=sys.stderr)
    answered = {(b.model_name, b.model_version) for b in results} or {(info.name, info.version)}
    for name, version in sorted(answered, key=lambda k: (len(k[1]), k)):
        print(f"{name} version {version}: {_meaning(infos[(name, version)])}", file=sys.stderr)
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
        "positive_label": info.positive_label,
        "negative_label": info.negative_label,
        "digest": info.digest,
        "features": [{"name": f.name, "type": f.type} for f in info.features],
    }


def _cmd_info(client: ScoringClient, args: argparse.Namespace) -> int:
    info = client.model_info()
    if args.json:
        print(json.dumps(_info_dict(info), indent=2))
        return EXIT_OK
    names = info.feature_names
    loaded_at = info.loaded_at.isoformat()
    first = ", ".join(names[:_FEATURES_SHOWN]) + (", ..." if len(names) > _FEATURES_SHOWN else "")
    rows = [
        ("model", info.name),
        ("version", info.version),
        ("run id", info.run_id or "-"),
        ("requested", info.requested_uri),
        ("source", info.source_uri),
        ("loaded from", f"{info.loaded_from} at {loaded_at} in {info.load_duration_seconds:.2f}s"),
        ("flavor", info.flavor),
        ("threshold", f"{info.threshold!r} ({info.threshold_source or 'unknown source'})"),
        ("decision", _meaning(info)),
        ("features", f"{len(names)}: {first}"),
    ]
    width = max(len(label) for label, _ in rows) + 1
    for label, value in rows:
        print(f"{label + ':':<{width}} {value}")
    return EXIT_OK


def _cmd_health(client: ScoringClient, args: argparse.Namespace) -> int:
    try:
        status = client.health(args.service)
    except ScoringError as exc:
        if exc.code != grpc.StatusCode.NOT_FOUND:
            raise
        known = ", ".join(repr(name) for name in client.health_services())
        print(f"error: unknown service {args.service!r}; the server reports the health of {known}", file=sys.stderr)
        return EXIT_FAILED
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


# Every command's --help ends with the exit codes, laid out as written.
_help_layout: Final[dict[str, Any]] = {
    "epilog": EXIT_CODES_HELP,
    "formatter_class": argparse.RawDescriptionHelpFormatter,
}


def _add_score_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    score = commands.add_parser(
        "score",
        parents=[common],
        help="score the rows of a CSV or JSON-lines file",
        description=(
            "Score rows from a CSV or JSON-lines file (or stdin). Columns must be the model's features, plus\n"
            "an optional id column that is copied to the output. Empty, NA and nan cells (null in JSON) mean\n"
            "missing. Output columns: [id,] " + ", ".join(OUTPUT_FIELDS) + ". decision is true when\n"
            "score >= threshold; label is the model version's word for it (its positive label, e.g. decline,\n"
            "when true; its negative label, e.g. approve, when false)."
        ),
        **_help_layout,
    )
    score.add_argument("file", nargs="?", metavar="FILE", help="input file; '-' or absent for stdin")
    score.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
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
    explain_output.add_explain_arguments(score, _positive_int)
    score.set_defaults(handler=_cmd_score)


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
    add_connection_arguments(common)
    parser = argparse.ArgumentParser(
        prog="tabserve-client",
        description="Command-line client of a tabserve scoring server.",
        **_help_layout,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_score_command(commands, common)

    info = commands.add_parser("info", parents=[common], help="show the live model version", **_help_layout)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(handler=_cmd_info)

    health = commands.add_parser(
        "health",
        parents=[common],
        help="grpc.health.v1 status (exit 0 when SERVING, 1 otherwise)",
        **_help_layout,
    )
    health.add_argument("--service", default="", help="service name ('' is the whole server)")
    health.set_defaults(handler=_cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = ScoringClient(args.target, timeout=args.timeout, **connection_arguments(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a TLS file
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with client:
            code: int = args.handler(client, args)
            return code
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ScoringError as exc:
        if exc.overloaded:
            print(f"error: the server is overloaded: it refused the call until the {args.timeout:g} s timeout ran "
                  "out, retried as it asked; try again later, or with a longer --timeout", file=sys.stderr)
        # The request id finds the server's log lines and decision record of the call (README, Request ids).
        request = f" (request id {exc.request_id})" if exc.request_id else ""
        print(f"error: {exc.code.name}: {exc.details or 'no details'}{request}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # e.g. piped into `head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # no second error at interpreter exit
        except OSError:
            pass
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
