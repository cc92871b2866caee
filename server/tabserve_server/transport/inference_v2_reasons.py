"""Reason codes on the Open Inference Protocol front: request parameters in, extra output tensors out.

Request parameters (ModelInferRequest.parameters):
- `tabserve.explain` (bool): explain; also implied by either parameter below or by requesting a reason output.
- `tabserve.explain.top_k` (int64, default 4, 1..20): reasons per explained row.
- `tabserve.explain.all_rows` (bool): every row, not only rows whose decision is adverse.

Extra outputs (`raw_output_contents`, one row per request row, `top_k` columns, strongest reason first; a row
that was not explained, or has fewer reasons, has '' and NaN in the free places):
`reason_code`, `reason_text`, `reason_feature` (BYTES `[rows, top_k]`), `reason_contribution` (FP64, margin
space), `reason_value` (FP64), and `expected_value` (FP64 `[1]`). BYTES elements are serialized as Triton
does: a 4-byte little-endian length, then the UTF-8 bytes. Without an explanation in the request they are
not produced (and not listed in ModelMetadata, whose parameters say whether the version has a reason table).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from tabserve_server.core.dataplane import Explanations
from tabserve_server.core.reasons import DEFAULT_TOP_K, ExplainOptions
from tabserve_server.errors import InvalidInput

EXPLAIN_PARAMETER = "tabserve.explain"
TOP_K_PARAMETER = "tabserve.explain.top_k"
ALL_ROWS_PARAMETER = "tabserve.explain.all_rows"
BYTES_OUTPUTS = {"reason_code": "code", "reason_text": "text", "reason_feature": "feature"}
FP64_OUTPUTS = {"reason_contribution": "contribution", "reason_value": "value"}
EXPECTED_VALUE_OUTPUT = "expected_value"
REASON_OUTPUTS = (*BYTES_OUTPUTS, *FP64_OUTPUTS, EXPECTED_VALUE_OUTPUT)


def _parameter(parameters: Any, name: str, kind: str) -> Any:
    value = parameters[name]
    if value.WhichOneof("parameter_choice") != kind:
        raise InvalidInput(f"request parameter {name!r} must be a {kind.removesuffix('_param')}")
    return getattr(value, kind)


def explain_options(request: Any, requested: Sequence[str]) -> ExplainOptions | None:
    """The explanation the request asks for, from its parameters and requested outputs; None: no explanation."""
    parameters = request.parameters
    wanted = any(n in parameters for n in (TOP_K_PARAMETER, ALL_ROWS_PARAMETER)) or any(
        n in REASON_OUTPUTS for n in requested
    )
    if EXPLAIN_PARAMETER in parameters:
        wanted = bool(_parameter(parameters, EXPLAIN_PARAMETER, "bool_param"))
        if not wanted and any(n in REASON_OUTPUTS for n in requested):
            raise InvalidInput(f"reason outputs requested with {EXPLAIN_PARAMETER}=false")
    if not wanted:
        return None
    top_k = _parameter(parameters, TOP_K_PARAMETER, "int64_param") if TOP_K_PARAMETER in parameters else DEFAULT_TOP_K
    all_rows = ALL_ROWS_PARAMETER in parameters and bool(_parameter(parameters, ALL_ROWS_PARAMETER, "bool_param"))
    return ExplainOptions(top_k=int(top_k), all_rows=all_rows)


def _bytes_tensor(cells: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (c.encode("utf-8") for c in cells))


def encode_reason_outputs(
    response: Any, explanations: Explanations, rows: int, top_k: int, names: Sequence[str]
) -> None:
    """Append the requested reason outputs (`names`, in that order) to `response`."""
    by_row = {e.row: e.reasons for e in explanations.rows}
    for name in names:
        if name == EXPECTED_VALUE_OUTPUT:
            response.outputs.add(name=name, datatype="FP64", shape=[1])
            response.raw_output_contents.append(np.array([explanations.expected_value], dtype="<f8").tobytes())
            continue
        field = BYTES_OUTPUTS.get(name) or FP64_OUTPUTS[name]
        grid: list[Any] = []
        for row in range(rows):
            reasons = by_row.get(row, ())
            values = [getattr(r, field) for r in reasons[:top_k]]
            grid += values + ["" if name in BYTES_OUTPUTS else float("nan")] * (top_k - len(values))
        if name in BYTES_OUTPUTS:
            response.outputs.add(name=name, datatype="BYTES", shape=[rows, top_k])
            response.raw_output_contents.append(_bytes_tensor(grid))
        else:
            response.outputs.add(name=name, datatype="FP64", shape=[rows, top_k])
            response.raw_output_contents.append(np.asarray(grid, dtype="<f8").tobytes())


__all__ = [
    "ALL_ROWS_PARAMETER", "EXPLAIN_PARAMETER", "REASON_OUTPUTS", "TOP_K_PARAMETER", "encode_reason_outputs",
    "explain_options",
]
