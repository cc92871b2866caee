"""`tabserve-admin registry check`, `promote` and `rollback` against a real SQLite registry and a real `mlflow server`.

One registry for the module (tests/admin_registry.py), seeded once; `mlflow server` serves the same store. The
commands run in this process through `cli.main` (one test runs the installed entry point), with MLflow's
process-wide URIs put back afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tabserve_admin import cli
from tabserve_admin.history import (
    HISTORY_LIMIT,
    HISTORY_TAG,
    TAG_VALUE_LIMIT,
    Entry,
    parse,
    record,
    serialize,
    walk,
)
from tabserve_demo.processes import MlflowServer
from tests.admin_registry import (
    ALL_DEEP,
    ALL_METADATA,
    CLEAN,
    DEEP_PROBLEMS,
    METADATA_PROBLEMS,
    RACING,
    ROLLING,
    SUBJECT,
    Seeded,
    problem_model,
    seed,
)
from tests.support import run_admin
from tests.test_quarantine import EXPECTED as CORRUPTION_REFUSALS

BACKENDS = ("sqlite", "mlflow-server")
REFUSALS = {
    **CORRUPTION_REFUSALS,
    "wrong_features": "feature schema of version", "missing_artifacts": "model file model.lgb is missing",
    "digest_mismatch": "but the version's tag tabserve.sha256 says 000", "threshold_out_of_range": "outside [0, 1]",
    "equal_labels": "the decision labels must be two different", "not_ready": "is PENDING_REGISTRATION, not READY",
    "too_large": "more than max_model_bytes (100000)",
}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    return seed(tmp_path_factory.mktemp("admin-registry"))


@pytest.fixture(scope="module")
def mlflow_url(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("admin-mlflow-server")
    with MlflowServer(seeded.tracking_uri, root / "artifacts", root / "mlflow-server.log").start() as server:
        server.wait_healthy()
        yield server.url


@pytest.fixture(scope="module", params=BACKENDS)
def registry(request: pytest.FixtureRequest, seeded: Seeded) -> tuple[str, str]:
    """(backend, tracking URI): the seeded SQLite store, directly or through `mlflow server`."""
    uri = seeded.tracking_uri if request.param == "sqlite" else request.getfixturevalue("mlflow_url")
    return request.param, uri


@pytest.fixture(autouse=True, scope="module")
def _mlflow_uris_restored() -> Iterator[None]:
    """The commands set MLflow's process-wide URIs, as the server does; later modules must not inherit them."""
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    yield
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.fixture(autouse=True)
def _no_server_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("TABSERVE_SERVER_")]:
        monkeypatch.delenv(name)


admin = run_admin


def check(capsys: pytest.CaptureFixture[str], uri: str, *args: str) -> tuple[int, dict[str, object]]:
    code, out, _ = admin(capsys, "registry", "check", *args, "--json", "--tracking-uri", uri)
    return code, json.loads(out)


def kinds(report: dict[str, object], model: str | None = None) -> set[str]:
    found = report["findings"]
    assert isinstance(found, list)
    return {f["kind"] for f in found if model is None or f["model"] == model}


# --- registry check ----------------------------------------------------------------------------------------


def test_a_clean_model_passes_in_both_modes(capsys: pytest.CaptureFixture[str], registry: tuple[str, str]) -> None:
    code, report = check(capsys, registry[1], CLEAN)
    assert (code, report["ok"], report["findings"]) == (0, True, [])
    assert report["models"] == [{"name": CLEAN, "versions": 2, "runs": 2, "aliases": {"production": "2"}}]
    code, deep = check(capsys, registry[1], CLEAN, "--deep")
    assert (code, deep["ok"], deep["findings"]) == (0, True, [])
    assert deep["models"][0]["artifact_bytes"] > 100_000  # type: ignore[index]


def test_the_table_for_people(capsys: pytest.CaptureFixture[str], registry: tuple[str, str]) -> None:
    code, out, _ = admin(capsys, "registry", "check", "--tracking-uri", registry[1], problem_model("duplicate_digest"))
    assert code == 1
    assert "duplicate_digest  p-duplicate_digest  1,3" in out and "NOT OK: 1 problem (metadata only" in out


@pytest.mark.parametrize("kind", METADATA_PROBLEMS)
def test_each_metadata_problem_is_found_alone(
    capsys: pytest.CaptureFixture[str], registry: tuple[str, str], kind: str
) -> None:
    code, report = check(capsys, registry[1], problem_model(kind))
    assert (code, kinds(report)) == (1, {kind})


def test_every_metadata_problem_is_found_together(capsys: pytest.CaptureFixture[str], registry: tuple[str, str]
                                                  ) -> None:
    code, report = check(capsys, registry[1], ALL_METADATA)
    assert (code, kinds(report)) == (1, set(METADATA_PROBLEMS))
    code, everything = check(capsys, registry[1])  # every registered model
    assert code == 1 and kinds(everything) == set(METADATA_PROBLEMS)
    assert not kinds(everything, CLEAN) and len(everything["models"]) > 10  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", DEEP_PROBLEMS)
def test_each_download_problem_is_found_alone_and_only_with_deep(
    capsys: pytest.CaptureFixture[str], seeded: Seeded, kind: str
) -> None:
    code, report = check(capsys, seeded.tracking_uri, problem_model(kind))
    assert (code, kinds(report)) == (0, set())
    code, report = check(capsys, seeded.tracking_uri, problem_model(kind), "--deep")
    assert (code, kinds(report)) == (1, {kind})


def test_every_download_problem_is_found_together(capsys: pytest.CaptureFixture[str], registry: tuple[str, str]
                                                  ) -> None:
    code, report = check(capsys, registry[1], ALL_DEEP, "--deep")
    assert (code, kinds(report)) == (1, set(DEEP_PROBLEMS))
    schema = next(f for f in report["findings"] if f["kind"] == "schema_change")  # type: ignore[attr-defined]
    assert schema["versions"] == ["1", "5"]  # the failed ones in between are skipped


def test_a_schema_change_is_a_note_when_the_server_allows_it(capsys: pytest.CaptureFixture[str], seeded: Seeded
                                                            ) -> None:
    code, report = check(capsys, seeded.tracking_uri, problem_model("schema_change"), "--deep",
                         "--server-flags=--allow-schema-change")
    assert (code, report["ok"], kinds(report)) == (0, True, {"schema_change"})


def test_an_unknown_model_and_bad_server_settings(capsys: pytest.CaptureFixture[str], seeded: Seeded) -> None:
    code, _, err = admin(capsys, "registry", "check", "no-such-model", "--tracking-uri", seeded.tracking_uri)
    assert code == 1 and "registered model 'no-such-model' not found" in err
    code, _, err = admin(capsys, "registry", "check", "--tracking-uri", seeded.tracking_uri,
                         "--server-flags=--max-model-bytes 0")
    assert code == 2 and "invalid --max-model-bytes / TABSERVE_SERVER_MAX_MODEL_BYTES" in err


def test_the_installed_command(seeded: Seeded) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABSERVE_SERVER_")}
    env["TABSERVE_SERVER_TRACKING_URI"] = seeded.tracking_uri  # the server's own variable
    command = Path(sys.executable).parent / "tabserve-admin"
    done = subprocess.run([str(command), "registry", "check", CLEAN], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "OK: nothing wrong (metadata only" in done.stdout


# --- promote and rollback ----------------------------------------------------------------------------------


def alias_of(uri: str, name: str, alias: str = "production") -> str:
    return str(MlflowClient(uri, uri).get_model_version_by_alias(name, alias).version)


def history(uri: str, name: str) -> list[dict[str, str]]:
    tags = MlflowClient(uri, uri).search_registered_models(filter_string=f"name = '{name}'")[0].tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", REFUSALS)
def test_promote_refuses_what_the_server_refuses(capsys: pytest.CaptureFixture[str], seeded: Seeded, kind: str
                                                 ) -> None:
    flags = ["--server-flags=--max-model-bytes 100000"] if kind == "too_large" else []
    code, _, err = admin(capsys, "promote", SUBJECT, seeded.broken[kind], "--reason", f"try {kind}",
                         "--tracking-uri", seeded.tracking_uri, *flags)
    assert code == 1 and err.startswith("tabserve-admin: refused: ") and REFUSALS[kind] in err, err
    assert alias_of(seeded.tracking_uri, SUBJECT) == "1" and history(seeded.tracking_uri, SUBJECT) == []


def test_promote_through_mlflow_server_refuses_too(capsys: pytest.CaptureFixture[str], seeded: Seeded,
                                                   mlflow_url: str) -> None:
    for kind in ("wrong_features", "half", "missing_artifacts"):
        code, _, err = admin(capsys, "promote", SUBJECT, seeded.broken[kind], "--reason", "x",
                             "--tracking-uri", mlflow_url)
        assert code == 1 and REFUSALS[kind] in err, err
    assert alias_of(mlflow_url, SUBJECT) == "1"


def test_promote_needs_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["promote", SUBJECT, "1"])
    assert exited.value.code == 2 and "--reason" in capsys.readouterr().err


def test_rollback_steps_back_and_refuses_to_guess(capsys: pytest.CaptureFixture[str], registry: tuple[str, str]
                                                  ) -> None:
    backend, uri = registry
    name = ROLLING[BACKENDS.index(backend)]
    move = ("--tracking-uri", uri)
    code, _, err = admin(capsys, "rollback", name, "--reason", "nothing recorded yet", *move)
    assert code == 1 and "no move of alias 'production'" in err and "--to VERSION" in err
    assert admin(capsys, "promote", name, "2", "--reason", "better auc", "--by", "alice", *move)[0] == 0
    code, out, _ = admin(capsys, "promote", name, "3", "--reason", "retrained", *move)
    assert code == 0 and "promoted: alias production of" in out and "-> version 3 (was 2)" in out
    assert alias_of(uri, name) == "3"
    code, out, _ = admin(capsys, "rollback", name, "--reason", "canary failing", "--by", "carol", *move)
    assert code == 0 and "rolled back:" in out and alias_of(uri, name) == "2"
    assert admin(capsys, "rollback", name, "--reason", "still bad", *move)[0] == 0 and alias_of(uri, name) == "1"
    steps = [(e["action"], e["previous"], e["version"], e["reason"]) for e in history(uri, name)]
    assert steps == [("promote", "1", "2", "better auc"), ("promote", "2", "3", "retrained"),
                     ("rollback", "3", "2", "canary failing"), ("rollback", "2", "1", "still bad")]
    assert [e["by"] for e in history(uri, name)][::2] == ["alice", "carol"]

    MlflowClient(uri, uri).set_registered_model_alias(name, "production", "3")  # moved outside the tool
    code, _, err = admin(capsys, "rollback", name, "--reason", "guess", *move)
    assert code == 1 and "it was moved outside the tool" in err and "--to VERSION" in err
    assert alias_of(uri, name) == "3" and len(history(uri, name)) == 4
    code, out, _ = admin(capsys, "rollback", name, "--to", "2", "--reason", "explicit", *move)
    assert code == 0 and alias_of(uri, name) == "2" and history(uri, name)[-1]["previous"] == "3"


def test_two_concurrent_promotions_both_recorded(seeded: Seeded) -> None:
    """Each verifies for seconds after reading the history; without the re-read and check at write time the
    later write replaced the earlier entry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABSERVE_SERVER_")}
    command = str(Path(sys.executable).parent / "tabserve-admin")
    runs = [subprocess.Popen([command, "promote", RACING, version, "--reason", f"race {version}", "--tracking-uri",
                              seeded.tracking_uri], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for version in ("2", "3")]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    recorded = history(seeded.tracking_uri, RACING)
    assert sorted(e["version"] for e in recorded) == ["2", "3"], (recorded, outputs)
    assert alias_of(seeded.tracking_uri, RACING) in ("2", "3")


def test_a_lost_history_write_is_written_again() -> None:
    """record() against a store that another writer overwrites right after the first write."""
    store: dict[str, str | None] = {"text": serialize([_entry("promote", "1", "2")])}
    stale = store["text"]
    writes: list[str] = []

    def write(text: str) -> None:
        writes.append(text)
        store["text"] = text
        if len(writes) == 1:  # a concurrent promotion that read before us writes last
            store["text"] = serialize([*parse(stale), _entry("promote", "2", "9")])

    mine = _entry("promote", "2", "3")
    done = record(lambda: store["text"], write, mine, settle_seconds=0.0)
    assert done.attempts == 2 and [e.version for e in done.entries] == ["2", "9", "3"]


def _entry(action: str, previous: str, version: str, alias: str = "production") -> Entry:
    return Entry(alias, action, version, previous, "by", "why", "at")


@pytest.mark.parametrize(("entries", "walked"), [
    ([], []),
    ([_entry("promote", "1", "2")], ["1", "2"]),
    ([_entry("promote", "", "1")], ["1"]),  # the alias did not exist before
    ([_entry("promote", "1", "2"), _entry("promote", "2", "3"), _entry("rollback", "3", "2")], ["1", "2"]),
    ([_entry("promote", "1", "2"), _entry("promote", "7", "8")], ["7", "8"]),  # moved outside the tool to 7
    ([_entry("promote", "1", "2"), _entry("promote", "2", "3"), _entry("rollback", "9", "2")], ["1", "2"]),
    ([_entry("promote", "1", "2"), _entry("rollback", "9", "5")], ["5"]),  # --to a version the walk never held
    ([_entry("promote", "1", "2"), _entry("promote", "4", "5", alias="champion")], ["1", "2"]),
])
def test_the_walk_a_rollback_steps_back_through(entries: list[Entry], walked: list[str]) -> None:
    assert walk(entries, "production") == walked


def test_the_history_stays_bounded() -> None:
    entries = [_entry("promote", str(i), str(i + 1)) for i in range(200)]
    kept = parse(serialize(entries))
    assert len(kept) == HISTORY_LIMIT and kept[-1] == entries[-1]
    long = [Entry("production", "promote", str(i), str(i - 1), "by", "w" * 300, "at") for i in range(50)]
    assert len(serialize(long)) <= TAG_VALUE_LIMIT and parse(serialize(long))[-1] == long[-1]
