"""Reason codes: the version's reason table, which decision is adverse, and the choice of reasons for one row.

Pure functions over numbers; nothing here imports grpc, mlflow or LightGBM. The contributions come from the
predictor (exact TreeSHAP, margin space); this module only checks the table and picks the reasons.

The reason table is a JSON file `extra_files/tabserve_reasons.json` in the model directory, where
`log_model(..., extra_files=["tabserve_reasons.json"])` puts it (see docs/explanations.md):

    {"format": "tabserve.reasons/v1",
     "reasons": {"<feature>": {"code": "<code>", "text": "<text>"}, ...},
     "excluded": ["<feature>", ...]}

Choice of reasons for one row (`choose_reasons`): a feature is eligible when it is not excluded and its
contribution pushes toward the adverse decision (> 0 when the adverse decision is the positive one, < 0 when
it is the negative one; 0 never). Eligible features are ordered by how hard they push (|contribution|,
largest first), ties by the feature's position in the model's schema (earlier first); the first `top_k` are
the reasons. So an excluded feature's place goes to the next-strongest eligible one, and a row may have fewer
than `top_k` reasons (never one that does not push toward the adverse decision).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tabserve_server.errors import InvalidInput, ModelLoadError

REASON_TABLE_FILE = "tabserve_reasons.json"
# Where MLflow's log_model(extra_files=[...]) puts the file in the model directory.
REASON_TABLE_PATH = f"extra_files/{REASON_TABLE_FILE}"
REASON_TABLE_FORMAT = "tabserve.reasons/v1"
DEFAULT_TOP_K = 4
MAX_TOP_K = 20


@dataclass(frozen=True)
class ReasonCode:
    code: str
    text: str


@dataclass(frozen=True)
class ReasonTable:
    """Feature -> reason code and text, and the features never given as a reason."""

    codes: Mapping[str, ReasonCode]
    excluded: frozenset[str]


def parse_reason_table(raw: bytes, feature_names: Sequence[str], label: str) -> ReasonTable:
    """The table in `raw`, checked against the model's features; ModelLoadError names what is wrong."""
    where = f"{label}: {REASON_TABLE_FILE}"
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: not JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != REASON_TABLE_FORMAT:
        raise ModelLoadError(f"{where}: expected an object with \"format\": \"{REASON_TABLE_FORMAT}\"")
    unexpected = sorted(set(document) - {"format", "reasons", "excluded"})
    if unexpected:
        raise ModelLoadError(f"{where}: unknown keys {unexpected}")
    codes = _codes(document.get("reasons", {}), where)
    excluded = document.get("excluded", [])
    if not isinstance(excluded, list) or not all(isinstance(f, str) for f in excluded):
        raise ModelLoadError(f"{where}: \"excluded\" must be a list of feature names")
    known = set(feature_names)
    unknown = sorted((set(codes) | set(excluded)) - known)
    if unknown:
        raise ModelLoadError(f"{where}: names features the model does not have: {unknown[:5]}")
    both = sorted(set(codes) & set(excluded))
    if both:
        raise ModelLoadError(f"{where}: features both excluded and given a reason code: {both[:5]}")
    return ReasonTable(codes, frozenset(excluded))


def _codes(reasons: Any, where: str) -> dict[str, ReasonCode]:
    if not isinstance(reasons, dict):
        raise ModelLoadError(f"{where}: \"reasons\" must map feature names to {{\"code\", \"text\"}}")
    codes: dict[str, ReasonCode] = {}
    owner: dict[str, str] = {}
    for feature, entry in reasons.items():
        code = entry.get("code") if isinstance(entry, dict) else None
        text = entry.get("text") if isinstance(entry, dict) else None
        if not isinstance(code, str) or not code.strip() or not isinstance(text, str) or not text.strip():
            raise ModelLoadError(f"{where}: feature {feature!r} needs a non-empty \"code\" and \"text\"")
        if code in owner:
            raise ModelLoadError(f"{where}: code {code!r} is given to both {owner[code]!r} and {feature!r}")
        owner[code] = feature
        codes[feature] = ReasonCode(code, text)
    return codes


def adverse_is_positive(adverse_label: str | None, positive: str, negative: str) -> bool:
    """Whether the adverse decision is decision=true, from the `tabserve.decision.adverse` tag (None: true)."""
    if adverse_label is None:
        return True
    label = adverse_label.strip()
    if label not in (positive, negative):
        raise ModelLoadError(
            f"model version tag tabserve.decision.adverse={label!r} names neither decision label "
            f"({positive!r}, {negative!r})"
        )
    return label == positive


@dataclass(frozen=True)
class ExplainOptions:
    """What a caller asks to be explained: `top_k` reasons for adverse rows only, or for every row."""

    top_k: int = DEFAULT_TOP_K
    all_rows: bool = False

    def checked(self) -> ExplainOptions:
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise InvalidInput(f"explanation top_k is {self.top_k}, expected 1..{MAX_TOP_K}")
        return self


@dataclass(frozen=True)
class Reason:
    feature: str
    value: float
    contribution: float  # margin (log-odds) space
    code: str  # '' when the version has no table or the table has no code for the feature
    text: str


@dataclass(frozen=True)
class RowExplanation:
    row: int  # index in the request
    reasons: tuple[Reason, ...]


def choose_reasons(
    contributions: np.ndarray, adverse_positive: bool, excluded_mask: np.ndarray, top_k: int
) -> list[int]:
    """Feature indices of the reasons for one row (module docstring: eligibility, order, tie-break)."""
    push = contributions if adverse_positive else -contributions
    eligible = np.flatnonzero((push > 0) & ~excluded_mask)
    # lexsort sorts by its last key first: -push descending, then index ascending for equal pushes.
    order = eligible[np.lexsort((eligible, -push[eligible]))]
    return [int(i) for i in order[:top_k]]


def explain_rows(
    rows: Sequence[int],
    matrix: np.ndarray,
    contributions: np.ndarray,
    *,
    names: Sequence[str],
    table: ReasonTable | None,
    adverse_positive: bool,
    top_k: int,
) -> list[RowExplanation]:
    """Reasons for `rows` of `matrix`, given their contributions ([len(rows), features], expected value dropped)."""
    excluded = np.array([table is not None and n in table.excluded for n in names], dtype=bool)
    codes = table.codes if table is not None else {}
    explained = []
    for position, row in enumerate(rows):
        chosen = choose_reasons(contributions[position], adverse_positive, excluded, top_k)
        reasons = []
        for i in chosen:
            entry = codes.get(names[i])
            reasons.append(Reason(
                names[i], float(matrix[row, i]), float(contributions[position, i]),
                entry.code if entry else "", entry.text if entry else "",
            ))
        explained.append(RowExplanation(row, tuple(reasons)))
    return explained


def rows_to_explain(decisions: np.ndarray, adverse_positive: bool, all_rows: bool) -> list[int]:
    """Indices of the rows to explain: every row, or those whose decision is the adverse one."""
    if all_rows:
        return list(range(len(decisions)))
    adverse = decisions if adverse_positive else ~decisions
    return [int(i) for i in np.flatnonzero(adverse)]


def request_cost(rows: int, explained_rows: int, explain_row_cost: int) -> int:
    """A request's weight against max_rows: each row once, each explained row `explain_row_cost` more."""
    return rows + explained_rows * explain_row_cost


__all__ = [
    "DEFAULT_TOP_K",
    "MAX_TOP_K",
    "REASON_TABLE_FILE",
    "REASON_TABLE_FORMAT",
    "REASON_TABLE_PATH",
    "ExplainOptions",
    "Reason",
    "ReasonCode",
    "ReasonTable",
    "RowExplanation",
    "adverse_is_positive",
    "choose_reasons",
    "explain_rows",
    "parse_reason_table",
    "request_cost",
    "rows_to_explain",
]
