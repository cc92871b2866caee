"""Demo credit-scoring LightGBM model: synthetic applicants, training and MLflow registration."""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import lightgbm
import mlflow
import mlflow.lightgbm
import numpy as np
import numpy.typing as npt
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME: Final = "credit-default"
DEFAULT_THRESHOLD: Final = 0.48
DEFAULT_ALIAS: Final = "production"
EXPERIMENT_NAME: Final = "tabserve-demo"
THRESHOLD_PARAM: Final = "optimal_threshold"
MODEL_ARTIFACT_FILE: Final = "model.lgb"
BROKEN_MODES: Final = ("missing_artifacts", "wrong_features")
# The seed of the version that bootstrap registers: version N of the demo model is trained with seed N.
BOOTSTRAP_SEED: Final = 1
_READY_TIMEOUT_S: Final = 300.0

FloatMatrix = npt.NDArray[np.float64]
IntVector = npt.NDArray[np.int64]

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


def _applicant_columns(n: int, rng: np.random.Generator) -> dict[str, FloatMatrix]:
    """All features without missing values, plus the private "_label_logit" entry."""
    risk = rng.standard_normal(n)  # latent credit risk of the applicant, never exposed
    c: dict[str, FloatMatrix] = {}

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

    monthly_inquiry_rate = np.exp(-2.0 + 0.5 * risk)
    inquiries = np.zeros(n)
    previous_window = 0
    for window in _INQUIRY_WINDOWS_M:
        inquiries = inquiries + rng.poisson(monthly_inquiry_rate * (window - previous_window))
        c[f"bureau_inquiries_{window}m"] = inquiries.copy()
        previous_window = window

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

    recent_delay = np.mean([c[f"payment_delay_m{m:02d}"] for m in range(1, 7)], axis=0)
    c["_label_logit"] = (
        _LABEL_INTERCEPT
        + 0.9 * (dti - 0.28) / 0.12
        - 0.012 * (c["credit_score"] - 690.0)
        + 1.4 * (utilization - 0.35)
        + 0.25 * c["bureau_inquiries_6m"]
        + 0.5 * delinquencies
        + 0.04 * recent_delay
        - 0.4 * np.log(c["annual_income"] / 55_000.0)
    )
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


def _wrong_feature_names() -> tuple[str, ...]:
    """FEATURE_NAMES with the first 10 names replaced, for a version whose schema does not match."""
    return (*(f"other_feature_{i:02d}" for i in range(10)), *FEATURE_NAMES[10:])


def _train(seed: int, n_rows: int, num_boost_round: int, feature_names: Sequence[str]) -> lightgbm.Booster:
    features, labels = make_applicants(n_rows, seed=seed)
    params: dict[str, Any] = {
        "objective": "binary",
        "metric": "auc",
        "learning_rate": 0.1,
        "num_leaves": 31,
        "min_data_in_leaf": 50,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "seed": seed,
        "deterministic": True,
        "num_threads": 2,
        "verbose": -1,
    }
    dataset = lightgbm.Dataset(features, label=labels, feature_name=list(feature_names))
    booster: lightgbm.Booster = lightgbm.train(params, dataset, num_boost_round=num_boost_round)
    return booster


def train_booster(seed: int = 0, n_rows: int = 20000, num_boost_round: int = 60) -> lightgbm.Booster:
    """Train the demo binary classifier (probability of default) on synthetic applicants."""
    return _train(seed, n_rows, num_boost_round, FEATURE_NAMES)


def _client(tracking_uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _default_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store, keep artifacts next to the database (<db dir>/artifacts), never in ./mlruns."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db_path = Path(tracking_uri.removeprefix(prefix).split("?", 1)[0])
    if not db_path.is_absolute():
        db_path = Path.cwd() / db_path
    return (db_path.parent / "artifacts").as_uri()


def _ensure_experiment(client: MlflowClient, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is None:
        logger.info("creating experiment %r (artifacts at %s)", EXPERIMENT_NAME, artifact_location)
        experiment_id: str = client.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_location)
        return experiment_id
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return str(experiment.experiment_id)


def _wait_until_ready(client: MlflowClient, model_name: str, version: str) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        status = client.get_model_version(model_name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION":
            raise RuntimeError(f"registration of {model_name} version {version} failed")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model_name} version {version} still {status} after {_READY_TIMEOUT_S}s")
        time.sleep(0.5)


def _local_path(uri: str) -> Path | None:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def _delete_model_file(client: MlflowClient, model_name: str, version: str) -> list[str]:
    """Delete model.lgb of a registered version from its artifact store; returns what was deleted."""
    artifact_uri: str = client.get_model_version_download_uri(model_name, version)
    if artifact_uri.startswith("models:/m-"):  # a LoggedModel that the registry did not resolve
        model_id = artifact_uri.removeprefix("models:/").split("/", 1)[0]
        artifact_uri = client.get_logged_model(model_id).artifact_location
    local = _local_path(artifact_uri)
    if local is not None:
        deleted = sorted(local.rglob(MODEL_ARTIFACT_FILE))
        for path in deleted:
            path.unlink()
        return [str(path) for path in deleted]
    # Remote store (e.g. mlflow-artifacts:/ proxied by a tracking server): go through its repository.
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo: Any = get_artifact_repository(artifact_uri)
    found: list[str] = []
    pending = [""]
    while pending:
        for info in repo.list_artifacts(pending.pop() or None):
            if info.is_dir:
                pending.append(info.path)
            elif info.path.rsplit("/", 1)[-1] == MODEL_ARTIFACT_FILE:
                found.append(info.path)
    for artifact_path in found:
        repo.delete_artifacts(artifact_path)
    return [f"{artifact_uri.rstrip('/')}/{artifact_path}" for artifact_path in found]


def register_demo_version(
    tracking_uri: str,
    model_name: str,
    *,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    alias: str | None = DEFAULT_ALIAS,
    stage: str | None = None,
    broken: str | None = None,
) -> str:
    """Train a demo booster and register it as a new version of `model_name`; returns the version.

    broken="missing_artifacts" deletes model.lgb from the artifact store after registering, and
    broken="wrong_features" trains on renamed features so the schema does not match FEATURE_NAMES.
    """
    if broken is not None and broken not in BROKEN_MODES:
        raise ValueError(f"broken must be one of {BROKEN_MODES} or None, got {broken!r}")
    client = _client(tracking_uri)
    experiment_id = _ensure_experiment(client, _default_artifact_location(tracking_uri))

    feature_names = _wrong_feature_names() if broken == "wrong_features" else FEATURE_NAMES
    started = time.monotonic()
    booster = train_booster(seed) if broken is None else _train(seed, 20000, 60, feature_names)
    logger.info("trained demo booster (seed %d) in %.1fs", seed, time.monotonic() - started)

    sample, _ = make_applicants(20, seed=seed + 1_000_003)
    sample_df = pd.DataFrame(sample, columns=list(feature_names), dtype=np.float64)
    signature = infer_signature(sample_df, np.asarray(booster.predict(sample), dtype=np.float64))

    with (
        warnings.catch_warnings(),
        mlflow.start_run(experiment_id=experiment_id, run_name=f"{model_name}-seed{seed}") as run,
    ):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        mlflow.log_param(THRESHOLD_PARAM, threshold)
        mlflow.log_params({"seed": seed, "broken": broken or "no"})
        mlflow.set_tag("tabserve.demo", "true")
        model_info = mlflow.lightgbm.log_model(
            booster,
            name="model",
            registered_model_name=model_name,
            signature=signature,
            input_example=None,
        )
    if model_info.registered_model_version is not None:
        version = str(model_info.registered_model_version)
    else:
        versions = client.search_model_versions(f"name='{model_name}' and run_id='{run.info.run_id}'")
        version = str(max(int(mv.version) for mv in versions))
    _wait_until_ready(client, model_name, version)
    logger.info("registered %s version %s (run %s)", model_name, version, run.info.run_id)

    if broken == "missing_artifacts":
        deleted = _delete_model_file(client, model_name, version)
        if not deleted:
            raise RuntimeError(f"found no {MODEL_ARTIFACT_FILE} to delete for {model_name} version {version}")
        logger.info("broke %s version %s: deleted %s", model_name, version, ", ".join(deleted))
    if alias is not None:
        client.set_registered_model_alias(model_name, alias, version)
        logger.info("alias %s of %s -> version %s", alias, model_name, version)
    if stage is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # model stages are deprecated since 2.9
            client.transition_model_version_stage(model_name, version, stage, archive_existing_versions=False)
        logger.info("stage of %s version %s -> %s", model_name, version, stage)
    return version


@dataclass(frozen=True)
class EmbeddedPaths:
    """Where the embedded default keeps its SQLite registry, artifacts and model cache."""

    data_dir: Path
    db_file: Path
    artifacts_dir: Path
    cache_dir: Path

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.db_file.absolute().as_posix()}"


def embedded_paths(data_dir: Path) -> EmbeddedPaths:
    """Paths of the embedded default under `data_dir` (made absolute)."""
    root = Path(data_dir).absolute()
    return EmbeddedPaths(
        data_dir=root,
        db_file=root / "mlflow.db",
        artifacts_dir=root / "artifacts",
        cache_dir=root / "model-cache",
    )


def _has_alias(client: MlflowClient, model_name: str, alias: str) -> bool:
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return alias in (registered.aliases or {})


def bootstrap_embedded_registry(
    data_dir: Path, model_name: str = DEFAULT_MODEL_NAME, threshold: float = DEFAULT_THRESHOLD
) -> str:
    """Make sure the embedded SQLite registry under `data_dir` serves `model_name`@production.

    Trains and registers a first version only when the alias is missing; returns the tracking URI.
    """
    paths = embedded_paths(data_dir)
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    paths.artifacts_dir.mkdir(parents=True, exist_ok=True)
    uri = paths.tracking_uri
    client = _client(uri)
    if _has_alias(client, model_name, DEFAULT_ALIAS):
        logger.info("embedded registry %s already serves %s@%s", uri, model_name, DEFAULT_ALIAS)
        return uri
    started = time.monotonic()
    logger.info("bootstrapping embedded registry %s with a demo %s model", uri, model_name)
    _ensure_experiment(client, paths.artifacts_dir.as_uri())
    version = register_demo_version(uri, model_name, seed=BOOTSTRAP_SEED, threshold=threshold, alias=DEFAULT_ALIAS)
    logger.info(
        "bootstrapped %s version %s@%s in %.1fs",
        model_name,
        version,
        DEFAULT_ALIAS,
        time.monotonic() - started,
    )
    return uri


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


def _next_seed(client: MlflowClient, model_name: str) -> int:
    versions = client.search_model_versions(f"name='{model_name}'")
    return max((int(mv.version) for mv in versions), default=0) + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tabserve-demo-model",
        description="Train the demo credit-scoring model and register a new version in MLflow.",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="embedded default data dir")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: embedded SQLite)")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--seed", type=int, help="training seed (default: latest version number + 1)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--set-alias", metavar="ALIAS", help="move this alias to the new version")
    parser.add_argument("--stage", help="legacy stage for the new version, e.g. Staging or Production")
    parser.add_argument("--broken", choices=BROKEN_MODES, help="register a deliberately broken version")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    embedded_uri = embedded_paths(args.data_dir).tracking_uri
    tracking_uri: str = args.tracking_uri or embedded_uri
    if tracking_uri == embedded_uri:
        bootstrap_embedded_registry(args.data_dir, args.model_name, args.threshold)
    client = _client(tracking_uri)
    seed: int = args.seed if args.seed is not None else _next_seed(client, args.model_name)
    version = register_demo_version(
        tracking_uri,
        args.model_name,
        seed=seed,
        threshold=args.threshold,
        alias=args.set_alias,
        stage=args.stage,
        broken=args.broken,
    )
    details = []
    if args.set_alias:
        details.append(f"alias {args.set_alias} -> {version}")
    if args.stage:
        details.append(f"stage {args.stage}")
    if args.broken:
        details.append(f"broken: {args.broken}")
    suffix = f" ({', '.join(details)})" if details else ""
    print(f"registered {args.model_name} version {version}{suffix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
