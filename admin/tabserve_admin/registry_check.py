"""`tabserve-admin registry check [NAME]`: the registry's health, for people (a table) and machines (`--json`).

By default from metadata alone (registry_facts.py: no download). `--deep` also loads every READY version
exactly as the server would (verification.py), to find missing or unreadable artifacts, model files that do
not match their digest tag and feature schemas that change from one version to the next, and to count the
artifacts' bytes. Exit status 1 when anything is wrong (to gate a CI pipeline), 0 when all is well.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from tabserve_admin import cli
from tabserve_admin.registry_facts import (
    KINDS,
    Finding,
    ModelFacts,
    Report,
    metadata_findings,
    model_names,
    read_model,
)
from tabserve_admin.server_config import add_registry_options, complain, registry_client, say, server_settings
from tabserve_admin.verification import Loaded, VersionGate
from tabserve_common.settings import SettingsError
from tabserve_monitor.registry import READY
from tabserve_server.errors import DigestMismatch, ModelLoadError, RegistryUnavailable
from tabserve_server.settings import ServerSettings

# How core/artifact.py (in the verifier process, so only its words come back) and core/loading.py say that an
# artifact is not there at all, as opposed to there but unreadable.
_MISSING_WORDS = ("is missing", "no MLmodel file", "downloading ")


def register(commands: Any) -> None:
    registry = commands.add_parser("registry", help="the MLflow registry's health",
                                   description="Commands about the MLflow registry the server loads from.")
    verbs = registry.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)
    check = verbs.add_parser(
        "check", help="find what is wrong in the registry (exit 1 when anything is)",
        description="Metadata alone by default: " + "; ".join(k for k in KINDS.values() if "--deep" not in k)
                    + ". --deep downloads every READY version and loads it as the server would.",
    )
    check.add_argument("name", nargs="?", default="", help="one registered model (default: every one)")
    check.add_argument("--deep", action="store_true",
                       help="also download and verify every READY version (costs the artifacts' bytes)")
    check.add_argument("--json", action="store_true", help="the report as JSON")
    add_registry_options(check)
    check.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = server_settings(args)
    except SettingsError as exc:
        complain(str(exc))
        return cli.EXIT_USAGE
    started = time.monotonic()
    try:
        report = check_registry(settings, args.name, deep=args.deep)
    except (RegistryUnavailable, LookupError) as exc:
        complain(str(exc))
        return cli.EXIT_FAILED
    except Exception as exc:  # the registry failed the call: say so in one line, not a traceback
        complain(f"the registry {settings.tracking_uri or '(default)'} could not be read: {type(exc).__name__}: "
                 f"{exc}")
        return cli.EXIT_FAILED
    seconds = time.monotonic() - started
    say(json.dumps(as_json(report, args.deep, seconds), indent=2) if args.json else table(report, args.deep, seconds))
    return cli.EXIT_OK if report.ok else cli.EXIT_FAILED


def check_registry(settings: ServerSettings, name: str = "", *, deep: bool = False) -> Report:
    """Every finding about `name` (every registered model when empty); LookupError when `name` does not exist."""
    client = registry_client(settings)
    report = Report()
    for model_name in [name] if name else model_names(client):
        facts = read_model(client, settings.tracking_uri, model_name)
        if facts is None:
            raise LookupError(f"registered model {model_name!r} not found in {settings.tracking_uri or 'the registry'}")
        report.models.append(facts)
        report.findings.extend(metadata_findings(facts))
    if deep:
        with VersionGate(settings) as gate:
            for facts in report.models:
                report.findings.extend(_deep_findings(gate, facts, report))
    return report


def _deep_findings(gate: VersionGate, facts: ModelFacts, report: Report) -> list[Finding]:
    """Load each READY version as the server would; compare each loaded schema with the previous one's."""
    found: list[Finding] = []
    previous: Loaded | None = None
    for version in (v.version for v in facts.versions if v.status == READY):
        try:
            loaded = gate.load(facts.name, version)
        except RegistryUnavailable:
            raise
        except ModelLoadError as exc:
            found.append(Finding(facts.name, _failure_kind(exc), (version,), f"version {version}: {exc}"))
            continue
        report.artifact_bytes[(facts.name, version)] = loaded.artifact_bytes
        if previous is not None:
            try:
                gate.check(loaded, previous, allow_schema_change=False)  # found either way, a problem if refused
            except ModelLoadError as exc:
                found.append(Finding(facts.name, "schema_change", (previous.model.version, version), str(exc),
                                     problem=not gate.settings.allow_schema_change))
        previous = loaded
    return found


def _failure_kind(exc: ModelLoadError) -> str:
    if isinstance(exc, DigestMismatch):
        return "digest_mismatch"
    if any(words in str(exc) for words in _MISSING_WORDS):
        return "artifact_missing"
    return "artifact_unreadable"


def as_json(report: Report, deep: bool, seconds: float) -> dict[str, Any]:
    models = []
    for facts in report.models:
        sizes = {v: b for (m, v), b in report.artifact_bytes.items() if m == facts.name}
        models.append({
            "name": facts.name, "versions": len(facts.versions), "runs": facts.runs, "aliases": facts.aliases,
            **({"artifact_bytes": sum(sizes.values()), "artifact_bytes_by_version": sizes} if deep else {}),
        })
    return {"ok": report.ok, "mode": "deep" if deep else "metadata", "seconds": round(seconds, 3),
            "problems": sum(f.problem for f in report.findings), "models": models,
            "findings": [f.as_dict() for f in report.findings]}


def table(report: Report, deep: bool, seconds: float) -> str:
    """The report for people: one row per model, then one row per finding, then the verdict."""
    rows = [("MODEL", "VERSIONS", "RUNS", "ALIASES", *(("ARTIFACT BYTES",) if deep else ()), "PROBLEMS")]
    for facts in report.models:
        aliases = ", ".join(f"{a}->{v}" for a, v in sorted(facts.aliases.items())) or "-"
        size = sum(b for (m, _), b in report.artifact_bytes.items() if m == facts.name)
        problems = sum(f.problem for f in report.findings if f.model == facts.name)
        rows.append((facts.name, str(len(facts.versions)), str(facts.runs), aliases,
                     *((str(size),) if deep else ()), str(problems)))
    lines = _columns(rows)
    if report.findings:
        lines += ["", *_columns([("FINDING", "MODEL", "VERSIONS", "DETAIL")] + [
            (f.kind if f.problem else f"{f.kind} (note)", f.model, ",".join(f.versions), f.detail)
            for f in report.findings
        ])]
    problems = sum(f.problem for f in report.findings)
    mode = "deep: every READY version downloaded and verified" if deep else "metadata only, nothing downloaded"
    verdict = "OK: nothing wrong" if report.ok else f"NOT OK: {problems} problem{'s' * (problems != 1)}"
    lines += ["", f"{verdict} ({mode}; {seconds:.1f} s)"]
    return "\n".join(lines)


def _columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
            for row in rows]
