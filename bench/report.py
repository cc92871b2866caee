"""What every section returns, and how the runner prints it: figures (with their generator) and targets.

A section returns a JSON-able dict (sections written elsewhere, e.g. bench/monitor_poll.py, follow it too):

    {"status": "ok" | "failed",
     "figures": [Figure-as-dict, ...],   # each measured number, with the generator that produced it
     "targets": [Target-as-dict, ...],   # each issue-4 target this section decides, with its ratio
     "notes": ["free text", ...]}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Who produced a figure: one of these, printed in every table row.
PYTHON_CLIENT = "python client"  # tabserve_client.ScoringClient, Python threads in the bench process
RAW_STUB = "raw stub"  # generated ScoringStub, request built from the numpy row per call
H2LOAD = "h2load"  # nghttp2's h2load with a prebuilt length-prefixed gRPC body
IN_PROCESS = "in-process"  # Booster.predict in the bench process, no RPC
V2_ASYNC = "python V2 async"  # grpc.aio Open Inference Protocol generator, prebuilt `input-0` requests


@dataclass(frozen=True)
class Figure:
    label: str  # what was measured, e.g. "single-row latency p50"
    server: str  # "project", "reference", "booster", ...
    generator: str
    value: float
    unit: str
    samples: int = 0  # calls or predictions behind the figure


@dataclass(frozen=True)
class Target:
    name: str
    ratio: float | None  # measured numerator / denominator; None when it could not be measured
    limit: float
    at_most: bool  # True: met when ratio <= limit; False: met when ratio >= limit
    basis: str  # what was divided by what
    extra_ok: bool = True  # a second condition of the target (e.g. zero failed calls)
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.ratio is None or not np.isfinite(self.ratio):
            return None
        within = self.ratio <= self.limit if self.at_most else self.ratio >= self.limit
        return bool(within and self.extra_ok)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "met": self.met}


@dataclass
class SectionResult:
    status: str = "ok"
    figures: list[Figure] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, label: str, server: str, generator: str, value: float, unit: str, *, samples: int = 0) -> float:
        self.figures.append(Figure(label, server, generator, float(value), unit, samples))
        return float(value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "figures": [dataclasses.asdict(f) for f in self.figures],
            "targets": [t.as_dict() for t in self.targets],
            "notes": list(self.notes),
        }


def percentile_ms(seconds: Sequence[float] | np.ndarray, q: float) -> float:
    if len(seconds) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(seconds, dtype=np.float64), q) * 1e3)


def ratio(numerator: float, denominator: float) -> float | None:
    if not denominator or not np.isfinite(numerator) or not np.isfinite(denominator):
        return None
    return numerator / denominator


# --- printing -----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if not isinstance(value, int | float):
        return str(value)
    if not np.isfinite(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    body = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_figures(sections: Mapping[str, Mapping[str, Any]]) -> str:
    rows: list[list[str]] = []
    for name, section in sections.items():
        status = section.get("status", "?")
        if status != "ok":
            note = status + ": " + "; ".join(section.get("notes", []))
            rows.append([name, note if len(note) <= 90 else note[:87] + "...", "", "", "", ""])
            continue
        for f in section.get("figures", []):
            rows.append([name, f["label"], f["server"], f["generator"], _fmt(f["value"]), f["unit"]])
    return "\n".join(_table(["section", "figure", "server", "generator", "value", "unit"], rows))


def format_targets(targets: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for t in targets:
        met = t.get("met")
        verdict = "met" if met is True else "NOT MET" if met is False else "not measured"
        limit = ("<= " if t.get("at_most") else ">= ") + f"{t['limit']}x"
        measured = "n/a" if t.get("ratio") is None else f"{t['ratio']:.2f}x"
        detail = t.get("detail", "")
        rows.append([t["name"], measured, limit, verdict, detail])
    return "\n".join(_table(["target", "measured", "limit", "result", "detail"], rows))


def markdown(results: Mapping[str, Any]) -> str:
    """The figures and targets of a results file as Markdown tables (for docs/performance.md)."""
    lines = ["| section | figure | server | generator | value | unit |", "| --- | --- | --- | --- | --- | --- |"]
    for name, section in results["sections"].items():
        if section.get("status") != "ok":
            lines.append(f"| {name} | {section.get('status')}: {'; '.join(section.get('notes', []))} | | | | |")
            continue
        for f in section.get("figures", []):
            cells = [name, f["label"], f["server"], f["generator"], _fmt(f["value"]), f["unit"]]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| target | measured | limit | result | basis |", "| --- | --- | --- | --- | --- |"]
    for t in results["targets"]:
        met = t.get("met")
        verdict = "**met**" if met is True else "**not met**" if met is False else "not measured"
        measured = "n/a" if t.get("ratio") is None else f"{t['ratio']:.2f}x"
        limit = ("≤ " if t.get("at_most") else "≥ ") + f"{t['limit']}x"
        basis = t.get("basis", "") + (f"; {t['detail']}" if t.get("detail") else "")
        lines.append(f"| {t['name']} | {measured} | {limit} | {verdict} | {basis} |")
    return "\n".join(lines)
