"""The demo model's reason table (docs/explanations.md): a code and a sentence per feature, `age` never a reason.

Logged with every demo version as `tabserve_reasons.json` (MLflow's extra_files), so the server gives an adverse
applicant's reasons with codes. Only the standard library and the feature names: cheap to import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from tabserve_demo.applicants import FEATURE_NAMES

# Protected or non-actionable: never given as a reason (the next-strongest feature takes its place).
EXCLUDED: Final = ("age",)
_TEXTS: Final = {
    "annual_income": "Income insufficient for amount of credit requested",
    "employment_years": "Length of employment",
    "loan_amount": "Amount of credit requested",
    "loan_to_income": "Amount of credit requested relative to income",
    "debt_to_income": "Debt obligations too high relative to income",
    "credit_score": "Credit bureau score",
    "credit_history_months": "Length of credit history",
    "revolving_utilization": "Proportion of revolving balances to credit limits too high",
    "num_delinquencies_2y": "Delinquencies on accounts in the last two years",
    "months_since_last_delinquency": "Time since last delinquency too short",
    "num_collections": "Accounts in collection",
    "num_charge_offs": "Accounts charged off",
    "num_public_records": "Public records on file",
}
_MONTHLY: Final = {
    "utilization": "Credit utilization",
    "payment_delay": "Payment delay",
    "statement_balance": "Statement balance",
    "payment_amount": "Amount paid",
    "cash_advance_amount": "Cash advances",
    "num_transactions": "Number of transactions",
    "overdraft_count": "Overdrafts",
    "salary_deposit": "Salary deposits",
    "card_spend": "Card spending",
    "missed_min_payment": "Missed minimum payments",
    "new_credit_lines": "New credit lines",
    "credit_limit": "Credit limit",
}


def _text(feature: str) -> str:
    if feature in _TEXTS:
        return _TEXTS[feature]
    family, _, month = feature.rpartition("_m")
    if family in _MONTHLY and month.isdigit():
        return f"{_MONTHLY[family]}, {int(month)} month(s) before application"
    return feature.replace("_", " ").capitalize()


def reason_table() -> dict[str, Any]:
    """The table as JSON: codes R001.. in the model's feature order, `age` excluded."""
    eligible = [f for f in FEATURE_NAMES if f not in EXCLUDED]
    return {
        "format": "tabserve.reasons/v1",
        "reasons": {f: {"code": f"R{i:03d}", "text": _text(f)} for i, f in enumerate(eligible, start=1)},
        "excluded": list(EXCLUDED),
    }


def write_reason_table(directory: Path) -> Path:
    """Write the table as `tabserve_reasons.json` in `directory`; returns its path."""
    path = directory / "tabserve_reasons.json"
    path.write_text(json.dumps(reason_table(), indent=1) + "\n", encoding="utf-8")
    return path


__all__ = ["EXCLUDED", "reason_table", "write_reason_table"]
