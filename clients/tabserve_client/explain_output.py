"""`tabserve-client score --explain`: its arguments, and the reason columns (CSV cells, JSON-lines records)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tabserve_client.client import Reason

DEFAULT_TOP_K: Final = 4  # the server's default when the request says 0
REASON_FIELDS: Final = ("feature", "value", "contribution", "code", "text")


@dataclass(frozen=True)
class Explain:
    """What `score --explain` asks for: `top_k` reasons, for adverse rows only or for all rows."""

    top_k: int = DEFAULT_TOP_K
    all_rows: bool = False


def add_explain_arguments(score: argparse.ArgumentParser, positive_int: Callable[[str], int]) -> None:
    score.add_argument(
        "--explain", action="store_true",
        help="add each adverse row's reasons: expected_value and reason_<i>_{feature,value,contribution,code,text}",
    )
    score.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K,
                       help=f"reasons per explained row, 1..20 (default: {DEFAULT_TOP_K})")
    score.add_argument("--explain-all-rows", action="store_true", help="explain every row, not only adverse ones")


def explain_from_arguments(args: argparse.Namespace) -> Explain | None:
    return Explain(args.top_k, args.explain_all_rows) if args.explain else None


def reason_columns(top_k: int) -> list[str]:
    """`expected_value`, then reason_<i>_<field> for i = 1..top_k, strongest reason first."""
    return ["expected_value"] + [f"reason_{i}_{name}" for i in range(1, top_k + 1) for name in REASON_FIELDS]


def reason_cells(reasons: Sequence[Reason], expected_value: float | None, top_k: int) -> list[str]:
    """A row's reason cells; a row that was not explained (or has fewer reasons) leaves them empty."""
    cells = [repr(expected_value) if reasons and expected_value is not None else ""]
    for i in range(top_k):
        if i < len(reasons):
            r = reasons[i]
            cells += [r.feature, repr(r.value), repr(r.contribution), r.code, r.text]
        else:
            cells += [""] * len(REASON_FIELDS)
    return cells


def reason_record(reasons: Sequence[Reason], expected_value: float | None) -> dict[str, Any]:
    """A row's JSON-lines fields: its reasons (empty when it was not explained) and the expected value.
    A missing value (NaN) is null, as in the input."""
    return {
        "reasons": [
            {"feature": r.feature, "value": None if math.isnan(r.value) else r.value,
             "contribution": r.contribution, "code": r.code, "text": r.text}
            for r in reasons
        ],
        "expected_value": expected_value,
    }


__all__ = [
    "DEFAULT_TOP_K", "REASON_FIELDS", "Explain", "add_explain_arguments", "explain_from_arguments", "reason_cells",
    "reason_columns", "reason_record",
]
