"""Reload levers, measured in one run: `python -m bench.reload_levers NAME=VALUE ... [--rounds N] [--quick]`.

Two project servers on the bench model are up at once, one with its settings as given by `--base` (default:
none) and one with the overrides (server settings, as TABSERVE_SERVER_* values); the reload section's
measurement (`serving.run_reload`: a steady window, then reloads, under 4 raw-stub callers) runs on each in turn,
alternating for N rounds, so drift on a shared machine hits both alike. The idle server costs nothing meanwhile.
Prints every round and the median reload-p99 ratio of each side; writes them to bench/.cache/reload-levers.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import serving
from bench.model import FULL, TINY, bench_rows, ensure_model, registry_for
from bench.processes import REPO, start_project_server, wait_serving

log = logging.getLogger("bench.reload_levers")
OUT = REPO / "bench" / ".cache" / "reload-levers.json"


def _pairs(items: Sequence[str]) -> dict[str, str]:
    pairs = dict(item.split("=", 1) for item in items)
    return {k.strip(): v.strip() for k, v in pairs.items()}


def _summary(section: dict[str, Any]) -> dict[str, Any]:
    figures = {f["label"]: f["value"] for f in section["figures"]}
    target = section["targets"][0]
    return {
        "steady_p99_ms": figures["single row, 4 callers, steady: p99"],
        "reload_p99_ms": figures["single row, 4 callers, during reloads: p99"],
        "ratio": target["ratio"],
        "failed": figures["failed calls (client side)"] + figures["failed calls (server metrics, non-OK Score)"],
        "reload_seconds": figures["reload time (SetAspiredVersion to swapped), mean"],
        "notes": section["notes"],  # the first failed calls' status codes and details, when any failed
    }


def run(base: dict[str, str], lever: dict[str, str], rounds: int, quick: bool) -> dict[str, Any]:
    model = ensure_model(TINY if quick else FULL)
    registry = registry_for(model)
    rows = bench_rows(1000 if quick else 5000)
    sides = {"base": base, "lever": {**base, **lever}}
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tabserve-levers-") as tmp:
        servers = {name: start_project_server(registry.tracking_uri, f"models:/{registry.model_name}@production",
                                              Path(tmp), name, 120.0, **values) for name, values in sides.items()}
        try:
            for server in servers.values():
                wait_serving(server.target)
            for round_no in range(rounds):
                order = list(sides) if round_no % 2 == 0 else list(reversed(sides))
                for name in order:
                    server = servers[name]
                    section = serving.run_reload(
                        server.target, control_port=int(server.ports["control_port"]),
                        metrics_port=int(server.ports["metrics_port"]), model_name=registry.model_name,
                        versions=registry.versions, rows=rows, quick=quick,
                    )
                    measured[name].append(_summary(section))
                    log.info("round %d %s: %s", round_no + 1, name, measured[name][-1])
        finally:
            for server in servers.values():
                server.stop()
    return {
        "base": base, "lever": lever, "rounds": rounds, "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2), "measured": measured,
        "median_ratio": {name: statistics.median(r["ratio"] for r in runs) for name, runs in measured.items()},
        "median_reload_seconds": {name: statistics.median(r["reload_seconds"] for r in runs)
                                  for name, runs in measured.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reload_levers", description=__doc__.split("\n")[0])
    parser.add_argument("lever", nargs="+", metavar="NAME=VALUE", help="server settings of the lever side")
    parser.add_argument("--base", nargs="*", default=[], metavar="NAME=VALUE", help="settings of both sides")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model: checks the harness works")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    results = run(_pairs(args.base), _pairs(args.lever), args.rounds, args.quick)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("base", "lever", "median_ratio", "median_reload_seconds",
                                               "load_average_1m_before", "load_average_1m_after")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
