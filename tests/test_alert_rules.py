"""Alert rules: promtool check + unit tests, runbook anchors and metric names."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import required_command
from tools.gen_alert_rules import main as gen_alert_rules

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "monitor" / "alerts" / "tabserve.rules.yml"
RULE_TESTS = ROOT / "monitor" / "alerts" / "tabserve.rules.test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"


@pytest.fixture(scope="module")
def promtool() -> str:
    return required_command("promtool", "prometheus")


def _run(promtool: str, *args: str) -> None:
    done = subprocess.run([promtool, *args], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def _alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _default_runbook_url() -> str:
    (url,) = re.findall(r"^RUNBOOK_URL \?= (\S+)$", MAKEFILE.read_text(), flags=re.MULTILINE)
    return str(url)


def _github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_promtool_check_rules(promtool: str) -> None:
    _run(promtool, "check", "rules", str(RULES.relative_to(ROOT)))


def test_promtool_unit_tests(promtool: str) -> None:
    _run(promtool, "test", "rules", str(RULE_TESTS.relative_to(ROOT)))


def test_expected_alerts_exist() -> None:
    names = {rule["alert"] for rule in _alerts()}
    assert names == {
        "TabserveServerDown",
        "TabserveMonitorDown",
        "TabserveRegistryUnreachable",
        "TabserveServedModelStale",
        "TabserveReloadFailing",
        "TabserveNotServing",
        "TabserveCanaryFailing",
        "TabserveHighErrorRate",
        "TabserveHighLatency",
        "TabserveShedding",
        "TabserveTargetAmbiguous",
        "TabserveDecisionRecordsDropped",
    }


def test_every_alert_has_severity_for_and_annotations() -> None:
    for rule in _alerts():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"page", "ticket"}, name
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key), f"{name}: missing {key}"
        # A pager opens it as is: absolute, from the Makefile's RUNBOOK_URL (`make alerts` writes it).
        assert annotations["runbook_url"] == f"{_default_runbook_url()}#{name.lower()}", name
        assert annotations["runbook_url"].startswith("https://"), name


def test_every_runbook_anchor_is_a_heading() -> None:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", RUNBOOK.read_text(), flags=re.MULTILINE)
    anchors = {_github_anchor(h) for h in headings}
    for rule in _alerts():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in docs/runbook.md"


def test_every_alert_has_both_a_firing_and_a_not_firing_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - firing == set(), "alerts without a firing test"
    assert names - quiet == set(), "alerts without a not-firing test"


def test_every_metric_in_the_rules_is_documented() -> None:
    readme = README.read_text()
    used = set()
    for rule in _alerts():
        used |= set(re.findall(r"\btabserve_(?:server|monitor)_[a-z_]+", rule["expr"]))
    assert used
    for metric in sorted(used):
        base = re.sub(r"_(bucket|count|sum)$", "", metric)
        assert f"`{metric}`" in readme or f"`{base}`" in readme, f"{metric} is not in README.md"


def test_make_alerts_points_rules_and_their_tests_at_another_runbook(promtool: str, tmp_path: Path) -> None:
    url = "https://wiki.example.com/ml/tabserve/runbook"
    assert gen_alert_rules(["--runbook-url", url, "--out", str(tmp_path)]) == 0
    rules = yaml.safe_load((tmp_path / RULES.name).read_text())["groups"]
    urls = {rule["alert"]: rule["annotations"]["runbook_url"] for group in rules for rule in group["rules"]}
    assert urls == {name: f"{url}#{name.lower()}" for name in urls} and len(urls) == len(_alerts())
    _run(promtool, "test", "rules", str(tmp_path / RULE_TESTS.name))
    # The checked-in files were written with the default, so checking them against another URL fails.
    assert gen_alert_rules(["--runbook-url", url, "--check"]) == 1
    assert gen_alert_rules(["--runbook-url", _default_runbook_url(), "--check"]) == 0
