"""Synthetic applicants of the demo credit-scoring model: the 189 feature names, rows and default labels, the
example CSV. Only numpy: the tests, the bench and the tools import it without mlflow or lightgbm."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

FloatMatrix = npt.NDArray[np.float64]
IntVector = npt.NDArray[np.int64]
Columns = dict[str, FloatMatrix]  # feature name -> one value per applicant

_APPLICANT_FEATURES: Final = (
    # applicant and employment
    "age",
    "annual_income",
    "employment_years",
    "months_at_current_address",
    "num_dependents",
    "household_size",
    "education_level",
    "is_homeowner",
    "is_self_employed",
    "has_coapplicant",
    # requested loan
    "loan_amount",
    "loan_term_months",
    "interest_rate",
    "monthly_payment",
    "loan_to_income",
    "down_payment_ratio",
    "collateral_value",
    "loan_purpose_code",
    # credit bureau summary
    "debt_to_income",
    "credit_score",
    "credit_history_months",
    "num_open_credit_lines",
    "num_closed_credit_lines",
    "num_credit_cards",
    "total_credit_limit",
    "total_revolving_balance",
    "revolving_utilization",
    "num_mortgage_accounts",
    "num_installment_accounts",
    "months_since_last_delinquency",
    "months_since_last_public_record",
    "num_public_records",
    "num_collections",
    "num_charge_offs",
    "num_delinquencies_2y",
    "savings_balance",
    "checking_balance",
    "months_since_oldest_account",
    "months_since_newest_account",
    "num_accounts_opened_12m",
)
_INQUIRY_WINDOWS_M: Final = (1, 3, 6, 12, 24)
_MONTHS: Final = 12
# Monthly history families, month m01 is the most recent one.
_MONTHLY_FAMILIES: Final = (
    "utilization",
    "payment_delay",
    "statement_balance",
    "payment_amount",
    "cash_advance_amount",
    "num_transactions",
    "overdraft_count",
    "salary_deposit",
    "card_spend",
    "missed_min_payment",
    "new_credit_lines",
    "credit_limit",
)

FEATURE_NAMES: tuple[str, ...] = (
    *_APPLICANT_FEATURES,
    *(f"bureau_inquiries_{w}m" for w in _INQUIRY_WINDOWS_M),
    *(f"{family}_m{m:02d}" for family in _MONTHLY_FAMILIES for m in range(1, _MONTHS + 1)),
)
N_FEATURES: Final = 189
assert len(FEATURE_NAMES) == N_FEATURES, len(FEATURE_NAMES)
assert len(set(FEATURE_NAMES)) == N_FEATURES
assert all(name.isidentifier() for name in FEATURE_NAMES)

# Columns where about 2% of values are missing (NaN).
MISSING_VALUE_COLUMNS: Final = (
    "employment_years",
    "months_since_last_delinquency",
    "savings_balance",
    "checking_balance",
    "salary_deposit_m01",
    "utilization_m12",
)
_MISSING_RATE: Final = 0.02
# Intercept of the label's logistic model, calibrated so that about 8% of applicants default.
_LABEL_INTERCEPT: Final = -4.45


def _sigmoid(x: FloatMatrix) -> FloatMatrix:
    return 1.0 / (1.0 + np.exp(-x))


def _as_float(x: npt.ArrayLike) -> FloatMatrix:
    return np.asarray(x, dtype=np.float64)


def _applicant_and_loan(c: Columns, n: int, rng: np.random.Generator, risk: FloatMatrix) -> None:
    """The applicant, employment and requested-loan columns."""
    age = np.clip(np.round(rng.normal(42.0, 12.0, n)), 18, 85)
    c["age"] = age
    income = np.round(rng.lognormal(math.log(55_000) - 0.15 * risk, 0.5) / 100.0) * 100.0
    c["annual_income"] = np.maximum(income, 6_000.0)
    c["employment_years"] = _as_float(np.round(np.minimum(age - 18.0, rng.exponential(6.0, n)), 1))
    c["months_at_current_address"] = np.round(rng.gamma(2.0, 30.0, n))
    dependents = _as_float(rng.poisson(1.0, n))
    c["num_dependents"] = dependents
    c["household_size"] = 1.0 + dependents + rng.binomial(1, 0.55, n)
    c["education_level"] = _as_float(rng.integers(0, 5, n))
    homeowner = _as_float(rng.binomial(1, _sigmoid(-0.5 + 0.03 * (age - 40.0) - 0.3 * risk)))
    c["is_homeowner"] = homeowner
    c["is_self_employed"] = _as_float(rng.binomial(1, 0.12, n))
    c["has_coapplicant"] = _as_float(rng.binomial(1, 0.2, n))

    loan = np.maximum(np.round(rng.lognormal(math.log(15_000), 0.7, n) / 100.0) * 100.0, 500.0)
    c["loan_amount"] = loan
    term = _as_float(rng.choice(np.array([12, 24, 36, 48, 60, 72]), n))
    c["loan_term_months"] = term
    rate = _as_float(np.round(np.clip(9.0 + 3.0 * risk + rng.normal(0.0, 1.5, n), 3.0, 30.0), 2))
    c["interest_rate"] = rate
    r = rate / 1200.0
    c["monthly_payment"] = np.round(loan * r / (1.0 - (1.0 + r) ** -term), 2)
    c["loan_to_income"] = loan / c["annual_income"]
    c["down_payment_ratio"] = np.round(rng.beta(2.0, 8.0, n), 3)
    secured = rng.binomial(1, 0.4, n)
    c["collateral_value"] = np.round(loan * rng.lognormal(0.0, 0.3, n) * secured, -1)
    c["loan_purpose_code"] = _as_float(rng.integers(0, 8, n))


def _bureau(c: Columns, n: int, rng: np.random.Generator, risk: FloatMatrix) -> tuple[FloatMatrix, FloatMatrix]:
    """The credit-bureau summary columns; returns debt-to-income and utilization before rounding."""
    age, homeowner = c["age"], c["is_homeowner"]
    dti = np.clip(0.28 + 0.08 * risk + rng.normal(0.0, 0.08, n), 0.0, 1.5)
    c["debt_to_income"] = np.round(dti, 4)
    c["credit_score"] = np.clip(np.round(690.0 - 60.0 * risk + rng.normal(0.0, 30.0, n)), 300, 850)
    history = np.round((age - 18.0) * 12.0 * rng.beta(3.0, 2.0, n))
    c["credit_history_months"] = history
    c["num_open_credit_lines"] = _as_float(rng.poisson(np.maximum(0.5, 6.0 + risk)))
    c["num_closed_credit_lines"] = _as_float(rng.poisson(4.0, n))
    c["num_credit_cards"] = _as_float(rng.poisson(3.0, n))
    limit = np.round(rng.lognormal(math.log(25_000) - 0.3 * risk, 0.6), -2)
    c["total_credit_limit"] = limit
    utilization = np.clip(_sigmoid(-0.8 + 0.9 * risk + rng.normal(0.0, 0.6, n)), 0.0, 1.2)
    c["revolving_utilization"] = np.round(utilization, 4)
    c["total_revolving_balance"] = np.round(limit * utilization, 2)
    c["num_mortgage_accounts"] = _as_float(rng.binomial(2, 0.2 + 0.3 * homeowner))
    c["num_installment_accounts"] = _as_float(rng.poisson(2.0, n))
    delinquencies = _as_float(rng.poisson(np.exp(-1.5 + 0.8 * risk)))
    c["num_delinquencies_2y"] = delinquencies
    c["months_since_last_delinquency"] = np.where(
        delinquencies > 0,
        rng.integers(0, 24, n),
        np.minimum(24.0 + np.round(rng.gamma(2.0, 24.0, n)), 240.0),
    )
    public_records = _as_float(rng.poisson(0.1 * np.exp(0.5 * risk)))
    c["num_public_records"] = public_records
    c["months_since_last_public_record"] = np.where(
        public_records > 0, rng.integers(0, 120, n), np.minimum(history, 240.0)
    )
    c["num_collections"] = _as_float(rng.poisson(0.15 * np.exp(0.6 * risk)))
    c["num_charge_offs"] = _as_float(rng.poisson(0.05 * np.exp(0.7 * risk)))
    c["savings_balance"] = np.round(rng.lognormal(math.log(4_000) - 0.4 * risk, 1.2), 2)
    c["checking_balance"] = np.round(rng.lognormal(math.log(2_500) - 0.2 * risk, 1.0), 2)
    c["months_since_oldest_account"] = history
    c["months_since_newest_account"] = np.floor(history * rng.random(n))
    c["num_accounts_opened_12m"] = _as_float(rng.poisson(np.exp(0.3 * risk)))
    return dti, utilization


def _inquiries(c: Columns, n: int, rng: np.random.Generator, risk: FloatMatrix) -> None:
    """Cumulative bureau inquiries over the last 1, 3, 6, 12 and 24 months."""
    monthly_inquiry_rate = np.exp(-2.0 + 0.5 * risk)
    inquiries = np.zeros(n)
    previous_window = 0
    for window in _INQUIRY_WINDOWS_M:
        inquiries = inquiries + rng.poisson(monthly_inquiry_rate * (window - previous_window))
        c[f"bureau_inquiries_{window}m"] = inquiries.copy()
        previous_window = window


def _monthly_history(c: Columns, n: int, rng: np.random.Generator, risk: FloatMatrix, utilization: FloatMatrix) -> None:
    """Twelve months of each monthly family; month m01 is the most recent one."""
    limit = c["total_credit_limit"]
    late_rate = _sigmoid(-3.2 + 1.0 * risk)
    pay_fraction_mean = 0.5 - 0.8 * risk
    advance_rate = _sigmoid(-2.5 + 0.8 * risk)
    util_m = utilization.copy()
    limit_m = limit.copy()
    monthly_salary = c["annual_income"] / 12.0
    for m in range(1, _MONTHS + 1):
        suffix = f"m{m:02d}"
        util_m = np.clip(util_m + rng.normal(0.0, 0.04, n), 0.0, 1.5)
        c[f"utilization_{suffix}"] = np.round(util_m, 4)
        late = rng.random(n) < late_rate
        c[f"payment_delay_{suffix}"] = np.where(late, rng.integers(1, 90, n), 0.0)
        balance = np.round(limit_m * util_m, 2)
        c[f"statement_balance_{suffix}"] = balance
        pay_fraction = _sigmoid(pay_fraction_mean + rng.normal(0.0, 0.8, n))
        c[f"payment_amount_{suffix}"] = np.round(balance * pay_fraction, 2)
        advance = rng.random(n) < advance_rate
        c[f"cash_advance_amount_{suffix}"] = np.where(advance, np.round(rng.lognormal(math.log(300), 0.8, n), 2), 0.0)
        c[f"num_transactions_{suffix}"] = _as_float(rng.poisson(25.0, n))
        c[f"overdraft_count_{suffix}"] = _as_float(rng.poisson(0.1 * np.exp(0.8 * risk)))
        paid = rng.random(n) > 0.03
        c[f"salary_deposit_{suffix}"] = np.round(monthly_salary * rng.lognormal(0.0, 0.05, n) * paid, 2)
        c[f"card_spend_{suffix}"] = np.round(rng.lognormal(math.log(1_200), 0.6, n), 2)
        c[f"missed_min_payment_{suffix}"] = _as_float(rng.binomial(1, _sigmoid(-3.5 + 1.1 * risk)))
        c[f"new_credit_lines_{suffix}"] = _as_float(rng.poisson(0.08 * np.exp(0.3 * risk)))
        c[f"credit_limit_{suffix}"] = limit_m
        limit_m = np.round(limit_m * np.where(rng.random(n) < 0.03, rng.uniform(0.7, 1.3, n), 1.0), -2)


def _label_logit(c: Columns, dti: FloatMatrix, utilization: FloatMatrix) -> FloatMatrix:
    """The logit of the default probability: a fixed logistic model on a handful of features."""
    delinquencies = c["num_delinquencies_2y"]
    recent_delay = np.mean([c[f"payment_delay_m{m:02d}"] for m in range(1, 7)], axis=0)
    logit: FloatMatrix = (
        _LABEL_INTERCEPT
        + 0.9 * (dti - 0.28) / 0.12
        - 0.012 * (c["credit_score"] - 690.0)
        + 1.4 * (utilization - 0.35)
        + 0.25 * c["bureau_inquiries_6m"]
        + 0.5 * delinquencies
        + 0.04 * recent_delay
        - 0.4 * np.log(c["annual_income"] / 55_000.0)
    )
    return logit


def _applicant_columns(n: int, rng: np.random.Generator) -> dict[str, FloatMatrix]:
    """All features without missing values, plus the private "_label_logit" entry.

    The parts draw from `rng` in a fixed order: the same seed gives the same applicants.
    """
    risk = rng.standard_normal(n)  # latent credit risk of the applicant, never exposed
    c: dict[str, FloatMatrix] = {}
    _applicant_and_loan(c, n, rng, risk)
    dti, utilization = _bureau(c, n, rng, risk)
    _inquiries(c, n, rng, risk)
    _monthly_history(c, n, rng, risk, utilization)
    c["_label_logit"] = _label_logit(c, dti, utilization)
    return c


def make_applicants(n_rows: int, seed: int = 0) -> tuple[FloatMatrix, IntVector]:
    """Synthetic applicants: float64 features [n_rows, 189] in FEATURE_NAMES order and 0/1 default labels.

    The label comes from a fixed logistic model on a handful of features (about 8% positives); the
    seed only changes the sample. NaN means missing (about 2% in MISSING_VALUE_COLUMNS).
    """
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    rng = np.random.default_rng(seed)
    columns = _applicant_columns(n_rows, rng)
    labels = (rng.random(n_rows) < _sigmoid(columns.pop("_label_logit"))).astype(np.int64)
    features = np.empty((n_rows, N_FEATURES), dtype=np.float64, order="C")
    for j, name in enumerate(FEATURE_NAMES):
        features[:, j] = columns[name]
    for name in MISSING_VALUE_COLUMNS:
        features[rng.random(n_rows) < _MISSING_RATE, FEATURE_NAMES.index(name)] = np.nan
    return features, labels


def wrong_feature_names() -> tuple[str, ...]:
    """FEATURE_NAMES with the first 10 names replaced, for a version whose schema does not match."""
    return (*(f"other_feature_{i:02d}" for i in range(10)), *FEATURE_NAMES[10:])


def _format_csv_value(value: float) -> str:
    if math.isnan(value):
        return ""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def write_example_applicants(path: Path, n_rows: int = 25, seed: int = 7) -> None:
    """Write a CSV of applicants: `applicant_id` (A0001, ...) then FEATURE_NAMES; NaN is an empty field."""
    features, _ = make_applicants(n_rows, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["applicant_id", *FEATURE_NAMES])
        for i, row in enumerate(features, start=1):
            writer.writerow([f"A{i:04d}", *(_format_csv_value(float(v)) for v in row)])
