"""`make demo-model` / `tabserve-demo-model`: train the demo model and register it as a new version in MLflow,
optionally moving an alias (`make demo-model` moves `production`, so a running server switches to it)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tabserve_demo.embedded import bootstrap_embedded_registry, embedded_paths
from tabserve_demo.registration import (
    BROKEN_MODES,
    DEFAULT_MODEL_NAME,
    DEFAULT_THRESHOLD,
    next_seed,
    register_demo_version,
    registry_client,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    embedded_uri = embedded_paths(args.data_dir).tracking_uri
    tracking_uri: str = args.tracking_uri or embedded_uri
    if tracking_uri == embedded_uri:
        bootstrap_embedded_registry(args.data_dir, args.model_name, args.threshold)
    client = registry_client(tracking_uri)
    previous = _alias_version(client, args.model_name, args.set_alias) if args.set_alias else None
    if args.set_alias:
        print(f"training a new version of {args.model_name}, then moving alias {args.set_alias} to it", flush=True)
    seed: int = args.seed if args.seed is not None else next_seed(client, args.model_name)
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
    if args.set_alias:
        print(f"moved alias {args.set_alias} from version {previous or '(none)'} to version {version}: a server "
              f"following models:/{args.model_name}@{args.set_alias} switches to it within seconds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
