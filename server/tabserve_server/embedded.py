"""`make run`: bootstrap the embedded SQLite registry, start the monitor sidecar, run the server in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tabserve_server import __main__ as server_main
from tabserve_server.demo_model import bootstrap_embedded_registry, embedded_paths
from tabserve_server.settings import ENV_PREFIX

MODEL_NAME = "credit-default"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="registry, artifacts and cache live here")
    args, server_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = embedded_paths(args.data_dir)
    tracking_uri = bootstrap_embedded_registry(args.data_dir, model_name=MODEL_NAME)
    # Defaults for the embedded registry; explicit TABSERVE_SERVER_* variables and flags still win.
    os.environ.setdefault(ENV_PREFIX + "TRACKING_URI", tracking_uri)
    os.environ.setdefault(ENV_PREFIX + "MODEL_URI", f"models:/{MODEL_NAME}@production")
    os.environ.setdefault(ENV_PREFIX + "CACHE_DIR", str(paths.cache_dir))
    os.environ.setdefault("TABSERVE_MONITOR_TRACKING_URI", tracking_uri)
    os.environ.setdefault("TABSERVE_MONITOR_MODEL_NAME", MODEL_NAME)
    os.environ.setdefault("TABSERVE_MONITOR_POLL_INTERVAL_SECONDS", "2")
    # The monitor is its own process, as in production; it goes when the server goes.
    monitor = subprocess.Popen([sys.executable, "-m", "tabserve_monitor"], stdout=subprocess.DEVNULL)
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
    try:
        return server_main.main(server_args)
    finally:
        monitor.terminate()
        monitor.wait(10)


if __name__ == "__main__":
    sys.exit(main())
