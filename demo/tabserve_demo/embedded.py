"""The embedded default of `make run`: a SQLite registry with the demo model under a data directory, the monitor
sidecar, and the server in the foreground.

`python -m tabserve_demo.embedded [--data-dir DIR] [server flags]`. Before anything else it checks that the
listen addresses are free, so a second `make run` says so in one line instead of starting half-way.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tabserve_common.address import unavailable_address
from tabserve_demo.registration import (
    BOOTSTRAP_SEED,
    DEFAULT_ALIAS,
    DEFAULT_MODEL_NAME,
    DEFAULT_THRESHOLD,
    ensure_experiment,
    register_demo_version,
    registry_client,
)

logger = logging.getLogger("tabserve_demo.embedded")  # not "__main__" under `python -m`

MODEL_NAME = DEFAULT_MODEL_NAME
MONITOR_ENV_PREFIX = "TABSERVE_MONITOR_"


@dataclass(frozen=True)
class EmbeddedPaths:
    """Where the embedded default keeps its SQLite registry, artifacts, model cache and decision log."""

    data_dir: Path
    db_file: Path
    artifacts_dir: Path
    cache_dir: Path
    decisions_dir: Path

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
        decisions_dir=root / "decisions",
    )


def _has_alias(tracking_uri: str, model_name: str, alias: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        registered = registry_client(tracking_uri).get_registered_model(model_name)
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
    if not paths.db_file.exists():
        logger.info("first run: creating the MLflow registry %s, then training and registering the demo model", uri)
    if _has_alias(uri, model_name, DEFAULT_ALIAS):
        logger.info("embedded registry %s already serves %s@%s", uri, model_name, DEFAULT_ALIAS)
        return uri
    started = time.monotonic()
    logger.info("no %s@%s in %s yet: training and registering a first version", model_name, DEFAULT_ALIAS, uri)
    ensure_experiment(registry_client(uri), paths.artifacts_dir.as_uri())
    version = register_demo_version(uri, model_name, seed=BOOTSTRAP_SEED, threshold=threshold, alias=DEFAULT_ALIAS)
    logger.info("bootstrapped %s version %s@%s in %.1f s", model_name, version, DEFAULT_ALIAS,
                time.monotonic() - started)
    return uri


def _listen_addresses(server_args: Sequence[str]) -> list[str]:
    """The server's and the monitor's listen addresses, from the same flags and variables they will read."""
    from tabserve_monitor.settings import MonitorSettings
    from tabserve_server.settings import ServerSettings

    server = ServerSettings.load_or_exit(server_args)
    monitor = MonitorSettings.load_or_exit([])
    return [server.address, server.control_address, server.metrics_address, monitor.metrics_address]


def _set_defaults(paths: EmbeddedPaths, tracking_uri: str) -> None:
    """Point the server and the monitor at the embedded registry; explicit variables and flags still win."""
    from tabserve_server.settings import ENV_PREFIX

    os.environ.setdefault(ENV_PREFIX + "TRACKING_URI", tracking_uri)
    os.environ.setdefault(ENV_PREFIX + "MODEL_URI", f"models:/{MODEL_NAME}@{DEFAULT_ALIAS}")
    os.environ.setdefault(ENV_PREFIX + "CACHE_DIR", str(paths.cache_dir))
    os.environ.setdefault(ENV_PREFIX + "DECISION_LOG_DIR", str(paths.decisions_dir))
    os.environ.setdefault(MONITOR_ENV_PREFIX + "TRACKING_URI", tracking_uri)
    os.environ.setdefault(MONITOR_ENV_PREFIX + "MODEL_NAME", MODEL_NAME)
    os.environ.setdefault(MONITOR_ENV_PREFIX + "POLL_INTERVAL_SECONDS", "2")


def _print_banner() -> None:
    examples = Path(__file__).resolve().parents[2] / "clients" / "examples" / "applicants.csv"
    if examples.is_relative_to(Path.cwd()):
        examples = examples.relative_to(Path.cwd())
    print(
        "\ntabserve is starting on localhost:50051 (metrics on :9100). In another terminal, try:\n\n"
        f"    .venv/bin/tabserve-client score {examples}\n"
        "    .venv/bin/tabserve-client info\n\n"
        "The monitor (metrics on :9101) follows alias `production`: promote another version with\n"
        "`make demo-model` and the server switches to it within seconds. Stop both with Ctrl-C.\n",
        file=sys.stderr,
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="registry, artifacts and cache live here")
    args, server_args = parser.parse_known_args(argv)
    problem = unavailable_address(_listen_addresses(server_args))
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = embedded_paths(args.data_dir)
    _set_defaults(paths, bootstrap_embedded_registry(args.data_dir, model_name=MODEL_NAME))
    # The monitor is its own process, as in production; it goes when the server goes.
    monitor = subprocess.Popen([sys.executable, "-m", "tabserve_monitor"], stdout=subprocess.DEVNULL)
    _print_banner()
    from tabserve_server import __main__ as server_main

    try:
        return server_main.main(server_args)
    finally:
        monitor.terminate()
        monitor.wait(10)


if __name__ == "__main__":
    sys.exit(main())
