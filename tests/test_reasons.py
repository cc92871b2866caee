"""core/reasons.py by tables, without processes: the reason table's checks, which decision is adverse, the choice
and order of reasons (excluded features, direction, tie-break), which rows are explained, and their cost."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from tabserve_server.core.reasons import (
    ExplainOptions,
    ReasonCode,
    ReasonTable,
    adverse_is_positive,
    choose_reasons,
    explain_rows,
    parse_reason_table,
    request_cost,
    rows_to_explain,
)
from tabserve_server.errors import InvalidInput, ModelLoadError

FEATURES = ("age", "income", "debt", "inquiries", "tenure")
NONE_EXCLUDED = np.zeros(len(FEATURES), dtype=bool)


def _table(**document: Any) -> bytes:
    return json.dumps({"format": "tabserve.reasons/v1", **document}).encode()


@pytest.mark.parametrize(
    ("contributions", "adverse_positive", "excluded", "top_k", "expected"),
    [
        # strongest push first; features pulling the other way are never reasons
        ([0.1, -0.5, 0.3, 0.2, 0.0], True, (), 4, [2, 3, 0]),
        # the adverse decision is the negative one: negative contributions push toward it
        ([0.1, -0.5, 0.3, -0.2, 0.0], False, (), 4, [1, 3]),
        # top_k cuts the list
        ([0.1, 0.5, 0.3, 0.2, 0.4], True, (), 2, [1, 4]),
        # an excluded feature's place goes to the next-strongest eligible one
        ([0.9, 0.5, 0.3, 0.2, 0.4], True, (0,), 2, [1, 4]),
        # equal pushes: the feature earlier in the schema first
        ([0.2, 0.3, 0.2, 0.3, 0.2], True, (), 4, [1, 3, 0, 2]),
        # a contribution of exactly zero never pushes
        ([0.0, 0.0, 0.0, 0.0, 0.0], True, (), 4, []),
        # nothing eligible but excluded features: no reasons at all
        ([0.5, -0.1, -0.2, -0.3, -0.4], True, (0,), 4, []),
    ],
)
def test_choose_reasons(
    contributions: list[float], adverse_positive: bool, excluded: tuple[int, ...], top_k: int, expected: list[int]
) -> None:
    mask = NONE_EXCLUDED.copy()
    mask[list(excluded)] = True
    assert choose_reasons(np.array(contributions), adverse_positive, mask, top_k) == expected


def test_explain_rows_carries_value_contribution_and_code() -> None:
    table = ReasonTable({"debt": ReasonCode("D1", "Debt too high")}, frozenset({"age"}))
    matrix = np.array([[30.0, 1.0, 2.0, 3.0, 4.0], [50.0, 5.0, 6.0, 7.0, np.nan]])
    contributions = np.array([[0.9, 0.0, 0.5, 0.1, 0.0]])
    (explained,) = explain_rows([1], matrix, contributions, names=FEATURES, table=table, adverse_positive=True, top_k=4)
    assert explained.row == 1
    assert [(r.feature, r.value, r.contribution, r.code, r.text) for r in explained.reasons] == [
        ("debt", 6.0, 0.5, "D1", "Debt too high"),
        ("inquiries", 7.0, 0.1, "", ""),  # in no table entry: the feature's name without a code
    ]
    (without_table,) = explain_rows(
        [1], matrix, contributions, names=FEATURES, table=None, adverse_positive=True, top_k=4
    )
    assert [r.feature for r in without_table.reasons] == ["age", "debt", "inquiries"]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"reasons": {"salary": {"code": "A", "text": "t"}}}, "features the model does not have: ['salary']"),
        ({"excluded": ["gender"]}, "features the model does not have: ['gender']"),
        ({"reasons": {"age": {"code": "A", "text": "t"}, "debt": {"code": "A", "text": "u"}}},
         "code 'A' is given to both 'age' and 'debt'"),
        ({"reasons": {"age": {"code": "A", "text": "t"}}, "excluded": ["age"]}, "both excluded and given"),
        ({"reasons": {"age": {"code": "", "text": "t"}}}, "needs a non-empty"),
        ({"reasons": {"age": "A"}}, "needs a non-empty"),
        ({"reasons": ["age"]}, "\"reasons\" must map"),
        ({"excluded": "age"}, "\"excluded\" must be a list"),
        ({"codes": {}}, "unknown keys ['codes']"),
    ],
)
def test_bad_tables_fail_the_load(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=r"tabserve_reasons\.json") as caught:
        parse_reason_table(_table(**document), FEATURES, "models:/m/1")
    assert message in str(caught.value)


@pytest.mark.parametrize("raw", [b"{", b"[]", json.dumps({"format": "other"}).encode(), b"\xff"])
def test_unreadable_tables_fail_the_load(raw: bytes) -> None:
    with pytest.raises(ModelLoadError, match=r"tabserve_reasons\.json"):
        parse_reason_table(raw, FEATURES, "models:/m/1")


def test_a_good_table() -> None:
    table = parse_reason_table(
        _table(reasons={"debt": {"code": "D1", "text": "Debt too high"}}, excluded=["age"]), FEATURES, "x"
    )
    assert table == ReasonTable({"debt": ReasonCode("D1", "Debt too high")}, frozenset({"age"}))


@pytest.mark.parametrize(
    ("tag", "expected"), [(None, True), ("decline", True), (" approve ", False), ("maybe", None)]
)
def test_adverse_is_positive(tag: str | None, expected: bool | None) -> None:
    if expected is None:
        with pytest.raises(ModelLoadError, match="names neither decision label"):
            adverse_is_positive(tag, "decline", "approve")
    else:
        assert adverse_is_positive(tag, "decline", "approve") is expected


@pytest.mark.parametrize(
    ("decisions", "adverse_positive", "all_rows", "expected"),
    [
        ([True, False, True], True, False, [0, 2]),
        ([True, False, True], False, False, [1]),
        ([True, False, True], False, True, [0, 1, 2]),
        ([False, False], True, False, []),
    ],
)
def test_rows_to_explain(decisions: list[bool], adverse_positive: bool, all_rows: bool, expected: list[int]) -> None:
    assert rows_to_explain(np.array(decisions), adverse_positive, all_rows) == expected


@pytest.mark.parametrize(("rows", "explained", "cost"), [(10, 0, 10), (10, 2, 150), (1, 1, 71)])
def test_request_cost(rows: int, explained: int, cost: int) -> None:
    assert request_cost(rows, explained, 70) == cost


@pytest.mark.parametrize(("top_k", "valid"), [(0, False), (1, True), (4, True), (20, True), (21, False)])
def test_top_k_bounds(top_k: int, valid: bool) -> None:
    options = ExplainOptions(top_k=top_k)
    if valid:
        assert options.checked() is options
    else:
        with pytest.raises(InvalidInput, match="top_k"):
            options.checked()
