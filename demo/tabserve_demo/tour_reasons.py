"""The `make demo` tour's look at reason codes: one declined applicant and the principal reasons the model gave."""

from __future__ import annotations

from tabserve_client import ScoringClient, ScoringError
from tabserve_demo.applicants import make_applicants
from tabserve_demo.reasons import EXCLUDED
from tabserve_demo.tour_output import TourError, detail

APPLICANTS = 200  # enough for several declined ones at the demo's ~8 % default rate


def show_declined_applicant(client: ScoringClient) -> tuple[str, int]:
    """Score applicants with explanations and print the first declined one with its reasons; the call's request id
    and the declined row."""
    rows = make_applicants(APPLICANTS, seed=2025)[0]
    try:
        batch = client.score(rows, explain=True)
    except ScoringError as exc:
        raise TourError(f"scoring with explanations failed: {exc}") from exc
    info = client.model_info()
    if not batch.reasons:
        raise TourError(f"none of {APPLICANTS} applicants was declined: no reasons to show")
    row = min(batch.reasons)
    reasons = batch.reasons[row]
    detail(f"applicant #{row + 1} of {APPLICANTS} more: P(default) {batch.scores[row]:.4f}, "
           f"{info.label(bool(batch.decisions[row]))}; principal reasons (never {', '.join(EXCLUDED)}):")
    for reason in reasons:
        detail(f"  {reason.code:<5} {reason.text:<58} {reason.feature} = {reason.value:g} "
               f"({reason.contribution:+.3f} log-odds)")
    if not info.has_reason_table or any(r.feature in EXCLUDED or not r.code for r in reasons):
        raise TourError(f"expected coded reasons without {EXCLUDED}, got {reasons}")
    return batch.request_id, row


__all__ = ["show_declined_applicant"]
