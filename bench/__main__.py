"""Benchmark runner (issue 4): `python -m bench [--quick] [--out PATH]`.

Runs every section on the same model and rows, prints one table (each figure names the generator that
produced it) and the targets (met / not met with the measured ratio), and writes it all as JSON with the
machine's core count, library versions, timestamp and git commit. Sections, in order:

  compute        in-process Booster.predict (the compute limit)                      bench/compute.py
  serving        project server vs reference servicer, Python generators            bench/serving.py
  h2load         the same, single-row throughput from h2load                         bench/h2load.py
  reload         p99 and failed calls while the version is switched under load       bench/serving.py
                 and promote-to-served: alias moved → new version served, monitor on   bench/promote.py
  multi-worker   several SO_REUSEPORT workers vs the single-process reference        bench/h2load.py
  v2             V2 front (production configuration) vs the fast-path V2 reference,  bench/open_inference.py
                 async Python V2 generator and h2load, alternating rounds
  mtls           single-row throughput over mutual TLS vs plaintext                  bench/mtls.py
  decision-log   single-row throughput, decision log on (digest) vs off              bench/decision_log.py
  explain        reasons served vs exact TreeSHAP in process (pred_contrib)          bench/explain.py
  compiled       backend=compiled vs lightgbm: two servers, and in process           bench/compiled.py
  overload       10 x the peak single-row load from h2load: goodput, admitted p99    bench/overload.py
  monitor-poll   monitor per-poll cost, 500 versions vs 1                            bench/monitor_poll.py
                 and tabserve-admin registry check on the same registries             bench/registry_check.py
  reload-memory  RSS after 50 reloads vs after 1                                     bench/reload_memory.py
(each returns a dict of the shape in bench/report.py). The exit code is 0 only when every section is "ok".

--quick uses a tiny model and a few calls per figure (the smoke test runs it); its numbers mean nothing.
--only SECTION (repeatable) runs only those sections (written to bench/.cache/results-only.json unless --out).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    compiled,
    compute,
    decision_log,
    explain,
    h2load,
    monitor_poll,
    mtls,
    open_inference,
    overload,
    promote,
    reload_memory,
    serving,
)
from bench.model import FULL, TINY, BenchModel, ModelSpec, Registry, bench_rows, ensure_model, registry_for
from bench.processes import REPO, start_project_server, start_reference_server, wait_serving
from bench.report import SectionResult, format_figures, format_targets, markdown
from tabserve_demo.processes import ChildProcess, ServerProcess

log = logging.getLogger("bench")

DEFAULT_OUT = REPO / "bench" / "results.json"
QUICK_OUT = REPO / "bench" / ".cache" / "results-quick.json"
ONLY_OUT = REPO / "bench" / ".cache" / "results-only.json"
SECTIONS = ("compute", "serving", "h2load", "reload", "multi-worker", "v2", "mtls", "decision-log", "explain",
            "compiled", "overload", "monitor-poll", "reload-memory")


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("grpcio", "protobuf", "lightgbm", "numpy", "mlflow"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _guarded(name: str, sections: dict[str, dict[str, Any]], body: Callable[[], dict[str, Any]]) -> None:
    """Run one section; a failure is recorded (with its traceback in the log) and the others still run."""
    if name not in _WANTED:
        return
    log.info("section %s ...", name)
    started = time.monotonic()
    try:
        section = body()
    except Exception as exc:
        log.error("section %s failed:\n%s", name, traceback.format_exc())
        section = SectionResult(status="failed", notes=[f"{type(exc).__name__}: {exc}"]).as_dict()
    section["seconds"] = round(time.monotonic() - started, 1)
    sections[name] = section
    log.info("section %s: %s in %.1f s", name, section.get("status"), section["seconds"])


_WANTED: set[str] = set(SECTIONS)  # --only narrows it


def _reload_and_promote(project: ServerProcess, registry: Registry, rows: Any, quick: bool, workdir: Path
                        ) -> dict[str, Any]:
    """The reload section: p99 while versions are switched under load, then promote-to-served with a monitor."""
    section = serving.run_reload(
        project.target, control_port=int(project.ports["control_port"]),
        metrics_port=int(project.ports["metrics_port"]), model_name=registry.model_name,
        versions=registry.versions, rows=rows, quick=quick,
    )
    promoted = promote.run(tracking_uri=registry.tracking_uri, model_name=registry.model_name,
                           versions=registry.versions, public_target=project.target,
                           control_target=project.control_target, workdir=workdir, quick=quick)
    for key in ("figures", "targets", "notes"):
        section[key] += promoted[key]
    section["promote_to_served"] = promoted["promote_to_served"]
    return section


def run_all(quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    load_before = os.getloadavg()
    spec = TINY if quick else FULL
    model = ensure_model(spec)
    if model.trained_seconds:
        log.info("trained the benchmark model in %.1f s (cached for next time)", model.trained_seconds)
    rows = bench_rows(1000 if quick else 5000)
    sections: dict[str, dict[str, Any]] = {}
    log.info("model ready after %.1f s", time.monotonic() - started)
    _guarded("compute", sections, lambda: compute.run(str(model.model_file), rows, quick))
    with tempfile.TemporaryDirectory(prefix="tabserve-bench-") as tmp:
        _server_sections(sections, Path(tmp), model=model, spec=spec, rows=rows, quick=quick, started=started)
    # The servers have stopped: these sections start their own processes.
    _guarded("monitor-poll", sections, lambda: monitor_poll.run(quick))
    _guarded("reload-memory", sections, lambda: reload_memory.run(quick))
    return _results(sections, quick=quick, spec=spec, model=model, started=started, load_before=load_before)


def _server_sections(sections: dict[str, dict[str, Any]], workdir: Path, *, model: BenchModel, spec: ModelSpec,
                     rows: Any, quick: bool, started: float) -> None:
    """The sections that measure servers. The first ones share one project server and the reference server; the
    later ones start project servers of their own, beside the reference. Every server stops on return."""
    with contextlib.ExitStack() as children:
        registry = registry_for(model)
        log.info("registered versions %s in %.1f s", registry.versions, time.monotonic() - started)
        reference = start_reference_server(model.model_file, workdir, registry.model_name, registry.versions[0])
        children.callback(reference.stop)  # SIGTERM first (leaving a `with` block would kill)
        project = start_project_server(registry.tracking_uri, f"models:/{registry.model_name}@production", workdir)
        children.callback(project.stop)
        project_target = f"127.0.0.1:{project.ports['public_port']}"
        reference_target = f"127.0.0.1:{reference.ports['public_port']}"
        wait_serving(project_target)
        log.info("both servers up and serving after %.1f s", time.monotonic() - started)

        _guarded("serving", sections, lambda: serving.run(
            project_target, reference_target, rows, quick, str(model.model_file)
        ))

        _guarded("h2load", sections, lambda: h2load.run(
            h2load.ensure_h2load(), workdir, rows, project=project, reference=reference, quick=quick
        ))
        _guarded("reload", sections, lambda: _reload_and_promote(project, registry, rows, quick, workdir))
        project.stop()  # the reference stays up for the multi-worker section's alternating rounds
        _own_server_sections(sections, workdir, registry, reference=reference, model=model, spec=spec, rows=rows,
                             quick=quick)


def _own_server_sections(sections: dict[str, dict[str, Any]], workdir: Path, registry: Registry, *,
                         reference: ChildProcess, model: BenchModel, spec: ModelSpec, rows: Any, quick: bool) -> None:
    """The sections that start project servers of their own (`start_server`) on the run's registry."""

    def start_server(name: str, start_timeout: float = 120.0, **overrides: Any) -> ServerProcess:
        return start_project_server(
            registry.tracking_uri, f"models:/{registry.model_name}@production", workdir, name, start_timeout,
            **overrides,
        )

    _guarded("multi-worker", sections, lambda: h2load.run_multi_worker(
        h2load.ensure_h2load(), workdir, rows, reference=reference, quick=quick,
        start_server=start_server, wait_serving=wait_serving,
    ))
    _guarded("v2", sections, lambda: open_inference.run(
        h2load.ensure_h2load(), workdir, rows, model_name=registry.model_name, reference=reference, quick=quick,
        start_server=start_server, wait_serving=wait_serving,
    ))
    _guarded("mtls", sections, lambda: mtls.run(
        workdir, rows, quick=quick, start_server=start_server, wait_serving=wait_serving
    ))
    _guarded("decision-log", sections, lambda: decision_log.run(
        workdir, rows, quick=quick, start_server=start_server, wait_serving=wait_serving
    ))
    _guarded("explain", sections, lambda: explain.run(
        str(model.model_file), rows, quick=quick, start_server=start_server, wait_serving=wait_serving
    ))
    _guarded("compiled", sections, lambda: compiled.run(
        str(model.model_file), spec.key(), rows, quick=quick, start_server=start_server, wait_serving=wait_serving
    ))
    _guarded("overload", sections, lambda: overload.run(
        h2load.ensure_h2load(), workdir, rows, quick=quick, start_server=start_server, wait_serving=wait_serving
    ))


def _results(sections: dict[str, dict[str, Any]], *, quick: bool, spec: ModelSpec, model: BenchModel, started: float,
             load_before: tuple[float, float, float]) -> dict[str, Any]:
    """The results file: the sections, every target, and what the figures were measured on (machine, versions,
    model, commit)."""
    targets = [t for section in sections.values() for t in section.get("targets", [])]
    return {
        "mode": "quick" if quick else "full",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m_before": round(load_before[0], 2),
            "load_average_1m_after": round(os.getloadavg()[0], 2),
        },
        "versions": _versions(),
        "model": {
            "key": spec.key(), **spec.__dict__, "trained_this_run_seconds": round(model.trained_seconds, 1),
            "first_train_seconds": round(model.first_train_seconds, 1),
        },
        "runtime_seconds": round(time.monotonic() - started, 1),
        "sections": sections,
        "targets": targets,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few calls: checks the harness works")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON results (default {DEFAULT_OUT.relative_to(REPO)}; "
                             f"--quick: {QUICK_OUT.relative_to(REPO)})")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS",
                        help="print the tables of an existing results file as Markdown, run nothing")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.only:
        _WANTED.intersection_update(args.only)
    results = run_all(args.quick)
    out: Path = args.out or (ONLY_OUT if args.only else QUICK_OUT if args.quick else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    print(f"\ntabserve benchmark ({results['mode']}), {results['machine']['cores']} cores, "
          f"commit {results['git_commit'][:10]}{' (dirty)' if results['git_dirty'] else ''}, {versions}")
    print(f"load average before/after: {results['machine']['load_average_1m_before']}"
          f"/{results['machine']['load_average_1m_after']}; runtime {results['runtime_seconds']} s\n")
    print(format_figures(results["sections"]))
    print()
    print(format_targets(results["targets"]))
    print(f"\nwritten to {out}")
    return 0 if all(s.get("status") == "ok" for s in results["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
