"""`make run`: bootstrap the embedded SQLite registry with the demo model, then run the server in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
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
    examples = Path(__file__).resolve().parents[2] / "clients" / "examples" / "applicants.csv"
    if examples.is_relative_to(Path.cwd()):
        examples = examples.relative_to(Path.cwd())
    print(
        "\ntabserve is starting on localhost:50051 (metrics on :9100). In another terminal, try:\n\n"
        f"    .venv/bin/tabserve-client score {examples}\n"
        "    .venv/bin/tabserve-client info\n\n"
        "Train and promote another version with `make demo-model`. Stop with Ctrl-C.\n",
        file=sys.stderr,
        flush=True,
    )
    return server_main.main(server_args)


if __name__ == "__main__":
    sys.exit(main())
