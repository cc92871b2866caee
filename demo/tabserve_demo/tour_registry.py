"""The `make demo` tour's registry chores: its last step, `tabserve-admin registry check` on the tour's own
registry with its output shown, and which versions the tour broke on purpose (the check expects findings there;
a rerun moves the alias off one).

The tour registers a broken version on purpose (its model file deleted), so the registry is not healthy, and
says so: the metadata check (nothing downloaded) must pass with exit status 0, since every version has its
digest tag and the alias is on a READY version; the deep check (every version downloaded and verified as the
server would load it) must exit 1, and its only findings must be `artifact_missing` on the versions the tour
broke on purpose. Any other exit status or finding fails the tour.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from tabserve_demo.tour_output import TourError, detail

CHECK_TIMEOUT_S = 300.0
EXPECTED_FINDING = "artifact_missing"


def is_broken(registry: Any, version: Any) -> bool:
    """A version the tour registered broken on purpose (its run's parameter `broken`)."""
    return str(registry.get_run(version.run_id).data.params.get("broken", "no")) != "no"


def alias_off_broken(registry: Any, model: str, alias: str) -> str:
    """The version `alias` is on, after moving it to the newest good version if it was on a broken one (a previous
    tour in the same data dir stopped after promoting the broken version)."""
    current = registry.get_model_version_by_alias(model, alias)
    if is_broken(registry, current):
        good = max((v for v in registry.search_model_versions(f"name='{model}'") if not is_broken(registry, v)),
                   key=lambda v: int(v.version))
        registry.set_registered_model_alias(model, alias, good.version)
        detail(f"alias {alias} was on broken version {current.version}: moved back to {good.version}")
        current = good
    return str(current.version)


def broken_versions(registry: Any, model: str) -> list[str]:
    """The versions of `model` the tour registered broken on purpose."""
    return [str(v.version) for v in registry.search_model_versions(f"name='{model}'") if is_broken(registry, v)]


def _run(tracking_uri: str, model: str, *flags: str) -> tuple[int, list[str]]:
    command = ["registry", "check", model, *flags]
    done = subprocess.run([sys.executable, "-m", "tabserve_admin", *command, "--tracking-uri", tracking_uri],
                          capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False)
    detail(f"$ tabserve-admin {' '.join(command)} --tracking-uri {tracking_uri}")
    lines = (done.stdout + done.stderr).splitlines()
    for line in lines:
        detail(f"  {line}")
    return done.returncode, lines


def _findings(lines: list[str]) -> list[tuple[str, set[str]]]:
    """(kind, versions) of each row of the table's FINDING block."""
    found: list[tuple[str, set[str]]] = []
    rows = iter(lines)
    for line in rows:
        if line.startswith("FINDING"):
            for row in rows:
                if not row.strip():
                    return found
                kind, _, versions, *_ = row.split()
                found.append((kind, set(versions.split(","))))
    return found


def check_registry(tracking_uri: str, model: str, broken: Iterable[str]) -> str:
    """Both checks with their output; the summary line. TourError when they find what the tour did not break."""
    broken = sorted(set(broken), key=int)
    code, _ = _run(tracking_uri, model)
    if code != 0:
        raise TourError(f"tabserve-admin registry check (metadata) exited {code}; 0 expected")
    detail(f"exit status 0, as expected: from metadata alone, {model} is healthy")
    code, lines = _run(tracking_uri, model, "--deep")
    findings = _findings(lines)
    unexpected = [f for f in findings if f[0] != EXPECTED_FINDING or not f[1] <= set(broken)]
    flagged = sorted(set().union(*(versions for _, versions in findings)), key=int) if findings else []
    if code != 1 or unexpected or flagged != broken:
        raise TourError(f"tabserve-admin registry check --deep exited {code} with findings {findings}; expected "
                        f"exit 1 with {EXPECTED_FINDING} on exactly the versions broken on purpose ({broken})")
    detail(f"exit status 1, as this demo expects: the tour broke version(s) {', '.join(broken)} on purpose "
           f"({EXPECTED_FINDING}); any other finding or exit status fails the tour")
    return f"registry check: metadata OK; --deep finds only the broken version(s) {', '.join(broken)}"


__all__ = ["check_registry"]
