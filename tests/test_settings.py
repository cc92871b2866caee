"""Settings of both processes: every bad value is refused at start with one line naming the flag and the variable.

The tables cover each declared range and relation (from a flag and from the environment), the boolean forms
(bare switch, `=false`, environment), and a real `python -m tabserve_server` / `tabserve_monitor` ending with
status 2 and that one line.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tabserve_common.settings import Settings, SettingsError
from tabserve_demo.processes import prefixed_env
from tabserve_monitor.settings import MonitorSettings
from tabserve_server.settings import ServerSettings

NEEDS_TOKEN = "must be loopback unless --control-token-file or TABSERVE_{}_CONTROL_TOKEN is set"
# (settings class, field, text given, what the error says after "invalid --flag / VARIABLE: ")
BAD_VALUES: list[tuple[type[Settings], str, str, str]] = [
    (ServerSettings, "workers", "-3", "must be >= 0, got -3"),
    (ServerSettings, "workers", "two", "must be an integer, got 'two'"),
    (ServerSettings, "max_rows", "0", "must be >= 1, got 0"),
    (ServerSettings, "max_message_bytes", "0", "must be >= 1 and <= 2147483647, got 0"),
    (ServerSettings, "max_message_bytes", str(2**31), f"must be >= 1 and <= 2147483647, got {2**31}"),
    (ServerSettings, "max_workers", "0", "must be >= 1, got 0"),
    (ServerSettings, "max_waiting", "-1", "must be >= 0, got -1"),
    (ServerSettings, "caller_share", "1.5", "must be > 0 and <= 1, got 1.5"),
    (ServerSettings, "max_concurrent_streams", "-1", "must be >= 0 and <= 2147483647, got -1"),
    (ServerSettings, "predict_threads", "-1", "must be >= 0, got -1"),
    (ServerSettings, "shutdown_grace_seconds", "-1", "must be >= 0, got -1.0"),
    (ServerSettings, "registry_timeout_seconds", "0", "must be > 0, got 0.0"),
    (ServerSettings, "registry_timeout_seconds", "inf", "must be a finite number, got inf"),
    (ServerSettings, "registry_timeout_seconds", "soon", "must be a number, got 'soon'"),
    (ServerSettings, "retry_initial_seconds", "0", "must be > 0, got 0.0"),
    (ServerSettings, "retry_initial_seconds", "61", "must be <= --retry-max-seconds (60.0), got 61.0"),
    (ServerSettings, "retry_max_seconds", "0", "must be > 0, got 0.0"),
    (ServerSettings, "keepalive_min_ping_interval_seconds", "-1", "must be >= 0 and <= 2147483, got -1.0"),
    (ServerSettings, "keepalive_max_ping_strikes", "-1", "must be >= 0, got -1"),
    (ServerSettings, "keepalive_permit_without_calls", "2",
     "must be true or false (also 1/0, yes/no, on/off), got '2'"),
    (ServerSettings, "max_connection_age_seconds", "2147484", "must be >= 0 and <= 2147483, got 2147484.0"),
    (ServerSettings, "max_connection_age_grace_seconds", "-0.5", "must be >= 0 and <= 2147483, got -0.5"),
    (ServerSettings, "load_timeout_seconds", "0", "must be > 0, got 0.0"),
    (ServerSettings, "max_model_bytes", "0", "must be >= 1, got 0"),
    (ServerSettings, "verifier_nice", "20", "must be >= 0 and <= 19, got 20"),
    (ServerSettings, "loader_nice", "-1", "must be >= 0 and <= 19, got -1"),
    (ServerSettings, "compile_attempts", "0", "must be >= 1 and <= 20, got 0"),
    (ServerSettings, "verifier_zygote", "maybe", "must be true or false (also 1/0, yes/no, on/off), got 'maybe'"),
    (ServerSettings, "backend", "gpu", "must be one of LIGHTGBM, COMPILED, got 'gpu'"),
    (ServerSettings, "default_threshold", "1.5", "must be >= 0 and <= 1, got 1.5"),
    (ServerSettings, "default_threshold", "-0.1", "must be >= 0 and <= 1, got -0.1"),
    (ServerSettings, "default_threshold", "nan", "must be a finite number, got nan"),
    (ServerSettings, "address", "localhost", "must be host:port (port 0-65535), got 'localhost'"),
    (ServerSettings, "address", "0.0.0.0:65536", "must be host:port (port 0-65535), got '0.0.0.0:65536'"),
    (ServerSettings, "control_address", "127.0.0.1:ctl", "must be host:port (port 0-65535), got '127.0.0.1:ctl'"),
    (ServerSettings, "control_address", "0.0.0.0:0", NEEDS_TOKEN.format("SERVER") + ", got '0.0.0.0:0'"),
    (ServerSettings, "control_address", ":50052", NEEDS_TOKEN.format("SERVER") + ", got ':50052'"),
    (ServerSettings, "health_address", "health", "must be host:port (port 0-65535) or empty, got 'health'"),
    (ServerSettings, "tls_cert_file", "tls.crt", "needs --tls-key-file set too, got 'tls.crt'"),
    (ServerSettings, "tls_key_file", "tls.key", "needs --tls-cert-file set too, got 'tls.key'"),
    (ServerSettings, "tls_client_ca_file", "ca.crt", "needs --tls-cert-file set too, got 'ca.crt'"),
    (ServerSettings, "allowed_callers", "scorer", "needs --tls-client-ca-file set too, got 'scorer'"),
    (ServerSettings, "metrics_cert_file", "m.crt", "needs --metrics-key-file set too, got 'm.crt'"),
    (ServerSettings, "metrics_key_file", "m.key", "needs --metrics-cert-file set too, got 'm.key'"),
    (ServerSettings, "metrics_address", "", "must be host:port (port 0-65535), got ''"),
    (ServerSettings, "model_uri", "", "must be non-empty, got ''"),
    (ServerSettings, "cache_dir", "", "must be non-empty, got ''"),
    (ServerSettings, "log_level", "verbose", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'verbose'"),
    (ServerSettings, "log_format", "logfmt", "must be one of TEXT, JSON, got 'logfmt'"),
    (ServerSettings, "allow_pyfunc", "maybe", "must be true or false (also 1/0, yes/no, on/off), got 'maybe'"),
    (ServerSettings, "tracing", "otlp", "must be true or false (also 1/0, yes/no, on/off), got 'otlp'"),
    (ServerSettings, "allow_schema_change", "2", "must be true or false (also 1/0, yes/no, on/off), got '2'"),
    (ServerSettings, "decision_log_inputs", "rows", "must be one of DIGEST, FULL, NONE, got 'rows'"),
    (ServerSettings, "decision_log_required", "maybe", "must be true or false (also 1/0, yes/no, on/off), got 'maybe'"),
    (ServerSettings, "decision_log_queue_size", "0", "must be >= 1, got 0"),
    (ServerSettings, "decision_log_max_file_bytes", "100", "must be >= 4096, got 100"),
    (ServerSettings, "decision_log_retention_bytes", "-1", "must be >= 0, got -1"),
    (ServerSettings, "decision_log_retention_bytes", "5000",
     "must be 0 or >= --decision-log-max-file-bytes (67108864), got 5000"),
    (ServerSettings, "decision_log_retention_seconds", "-1", "must be >= 0, got -1.0"),
    (MonitorSettings, "poll_interval_seconds", "0", "must be > 0, got 0.0"),
    (MonitorSettings, "audit_interval_seconds", "-5", "must be > 0, got -5.0"),
    (MonitorSettings, "backoff_max_seconds", "0", "must be > 0, got 0.0"),
    (MonitorSettings, "rpc_timeout_seconds", "0", "must be > 0, got 0.0"),
    (MonitorSettings, "control_address", "server", "must be host:port (port 0-65535), got 'server'"),
    (MonitorSettings, "control_address", "10.0.0.5:50052", NEEDS_TOKEN.format("MONITOR") + ", got '10.0.0.5:50052'"),
    (MonitorSettings, "tls_cert_file", "client.crt", "needs --tls-key-file set too, got 'client.crt'"),
    (MonitorSettings, "tls_key_file", "client.key", "needs --tls-cert-file set too, got 'client.key'"),
    (MonitorSettings, "tls", "maybe", "must be true or false (also 1/0, yes/no, on/off), got 'maybe'"),
    (MonitorSettings, "control_tls", "maybe", "must be true or false (also 1/0, yes/no, on/off), got 'maybe'"),
    (MonitorSettings, "metrics_cert_file", "m.crt", "needs --metrics-key-file set too, got 'm.crt'"),
    (MonitorSettings, "public_address", "server:", "must be host:port (port 0-65535), got 'server:'"),
    (MonitorSettings, "metrics_address", ":-1", "must be host:port (port 0-65535), got ':-1'"),
    (MonitorSettings, "model_name", "", "must be non-empty, got ''"),
    (MonitorSettings, "alias", "", "must be non-empty unless --stage is set, got ''"),
    (MonitorSettings, "canary", "sometimes", "must be true or false (also 1/0, yes/no, on/off), got 'sometimes'"),
    (MonitorSettings, "log_level", "loud", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'loud'"),
    (MonitorSettings, "log_format", "xml", "must be one of TEXT, JSON, got 'xml'"),
]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("source", ["flag", "environment"])
@pytest.mark.parametrize(("cls", "name", "text", "problem"), BAD_VALUES)
def test_a_bad_value_names_the_flag_and_the_variable(
    cls: type[Settings], name: str, text: str, problem: str, source: str
) -> None:
    if source == "flag":
        argv, environ = [f"{_flag(name)}={text}"], {}
    else:
        argv, environ = [], {cls.env_prefix + name.upper(): text}
    with pytest.raises(SettingsError) as caught:
        cls.load(argv, environ)
    assert str(caught.value) == f"invalid {_flag(name)} / {cls.env_prefix}{name.upper()}: {problem}"


def test_every_checked_field_has_a_bad_value_in_the_table() -> None:
    """A field that gains a range or a relation gains a row above."""
    for cls in (ServerSettings, MonitorSettings):
        checked = {
            f.name for f in dataclasses.fields(cls)
            if any(f.metadata.get(rule) for rule in ("minimum", "above", "maximum", "choices", "address", "non_empty"))
            or f.type == "bool"
        }
        tabled = {name for table_cls, name, _, _ in BAD_VALUES if table_cls is cls}
        assert checked <= tabled, checked - tabled


@pytest.mark.parametrize(
    ("cls", "values"),
    [
        (ServerSettings, {"workers": 0, "max_waiting": 0, "predict_threads": 0, "shutdown_grace_seconds": 0}),
        (ServerSettings, {"default_threshold": 0.0, "max_rows": 1, "max_message_bytes": 2**31 - 1}),
        (ServerSettings, {"default_threshold": 1.0, "retry_initial_seconds": 5.0, "retry_max_seconds": 5.0}),
        (ServerSettings, {"address": "[::1]:0", "control_address": "localhost:65535", "metrics_address": ":9100"}),
        (ServerSettings, {"log_level": "debug", "log_format": "JSON"}),
        (ServerSettings, {"control_address": "0.0.0.0:50052", "control_token_file": "/run/secrets/token",
                          "tls_cert_file": "tls.crt", "tls_key_file": "tls.key"}),
        (ServerSettings, {"control_address": "127.0.0.2:50052", "health_address": ""}),
        (ServerSettings, {"tls_cert_file": "tls.crt", "tls_key_file": "tls.key", "tls_client_ca_file": "ca.crt",
                          "allowed_callers": "a, b", "health_address": "0.0.0.0:8080"}),
        (MonitorSettings, {"control_address": "10.0.0.5:50052", "control_token_file": "/run/secrets/token",
                           "control_tls": True, "tls": True, "tls_cert_file": "c.crt", "tls_key_file": "c.key"}),
        (MonitorSettings, {"alias": "", "stage": "Production", "log_level": "warning"}),
        # A shorter back-off than the poll interval only retries sooner after a failure: allowed.
        (MonitorSettings, {"poll_interval_seconds": 300.0, "backoff_max_seconds": 60.0}),
    ],
)
def test_values_at_the_edges_are_accepted(cls: type[Settings], values: dict[str, Any]) -> None:
    argv = [f"{_flag(name)}={value}" for name, value in values.items()]
    loaded = cls.load(argv, {})
    assert {name: getattr(loaded, name) for name in values} == values


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(SettingsError) as built:
        ServerSettings(workers=-3)
    assert str(built.value) == "invalid --workers / TABSERVE_SERVER_WORKERS: must be >= 0, got -3"
    with pytest.raises(SettingsError) as replaced:
        dataclasses.replace(ServerSettings(), max_rows=0)
    assert str(replaced.value) == "invalid --max-rows / TABSERVE_SERVER_MAX_ROWS: must be >= 1, got 0"


def test_an_unknown_flag_is_one_line() -> None:
    with pytest.raises(SettingsError) as caught:
        ServerSettings.load(["--wrokers=2"], {})
    assert str(caught.value) == "unrecognized arguments: --wrokers=2 (--help lists the settings)"


def test_an_abbreviated_flag_is_refused() -> None:
    with pytest.raises(SettingsError) as caught:
        ServerSettings.load(["--max-worker=2"], {})
    assert str(caught.value) == "unrecognized arguments: --max-worker=2 (--help lists the settings)"


@pytest.mark.parametrize(
    ("cls", "argv", "environ", "expected"),
    [
        (ServerSettings, [], {}, {"allow_pyfunc": False}),
        (ServerSettings, ["--allow-pyfunc"], {}, {"allow_pyfunc": True}),
        (ServerSettings, ["--allow-pyfunc=false"], {}, {"allow_pyfunc": False}),
        (ServerSettings, ["--allow-pyfunc=TRUE"], {}, {"allow_pyfunc": True}),
        (ServerSettings, ["--allow-pyfunc", "off"], {}, {"allow_pyfunc": False}),
        (ServerSettings, ["--allow-pyfunc", "--workers", "2"], {}, {"allow_pyfunc": True, "workers": 2}),
        (ServerSettings, ["--allow-schema-change", "--allow-pyfunc"], {},
         {"allow_schema_change": True, "allow_pyfunc": True}),
        (ServerSettings, [], {"TABSERVE_SERVER_ALLOW_PYFUNC": "yes"}, {"allow_pyfunc": True}),
        (ServerSettings, ["--allow-pyfunc=0"], {"TABSERVE_SERVER_ALLOW_PYFUNC": "1"}, {"allow_pyfunc": False}),
        (ServerSettings, ["--allow-pyfunc"], {"TABSERVE_SERVER_ALLOW_PYFUNC": "false"}, {"allow_pyfunc": True}),
        (MonitorSettings, [], {}, {"canary": True}),
        (MonitorSettings, ["--canary=false"], {}, {"canary": False}),
        (MonitorSettings, ["--canary"], {"TABSERVE_MONITOR_CANARY": "no"}, {"canary": True}),
    ],
)
def test_boolean_forms(
    cls: type[Settings], argv: list[str], environ: dict[str, str], expected: dict[str, Any]
) -> None:
    loaded = cls.load(argv, environ)
    assert {name: getattr(loaded, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("module", "argv", "values", "line"),
    [
        ("tabserve_server", ["--workers=-3"], {},
         "tabserve-server: invalid --workers / TABSERVE_SERVER_WORKERS: must be >= 0, got -3"),
        ("tabserve_monitor", [], {"poll_interval_seconds": "0"},
         "tabserve-monitor: invalid --poll-interval-seconds / TABSERVE_MONITOR_POLL_INTERVAL_SECONDS: "
         "must be > 0, got 0.0"),
        ("tabserve_server", ["--control-token=s3cret"], {},
         "tabserve-server: --control-token is not accepted: a secret on the command line shows in every process "
         "list; use --control-token-file FILE or the environment variable TABSERVE_SERVER_CONTROL_TOKEN"),
    ],
)
def test_the_process_exits_2_with_one_line(module: str, argv: list[str], values: dict[str, str], line: str) -> None:
    prefix = "TABSERVE_SERVER_" if module == "tabserve_server" else "TABSERVE_MONITOR_"
    result = subprocess.run(
        [sys.executable, "-m", module, *argv], env=prefixed_env(prefix, values), capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (2, "", line + "\n")


@pytest.mark.parametrize("cls", [ServerSettings, MonitorSettings])
def test_the_control_token_is_never_a_flag_and_comes_from_a_file_or_the_environment(
    cls: type[ServerSettings] | type[MonitorSettings], tmp_path: Path
) -> None:
    variable = cls.env_name("control_token")
    for argv in (["--control-token=s3cret"], ["--control-token", "s3cret"], ["--control-token"]):
        with pytest.raises(SettingsError) as caught:
            cls.load(argv, {})
        assert str(caught.value) == (
            "--control-token is not accepted: a secret on the command line shows in every process list; "
            f"use --control-token-file FILE or the environment variable {variable}")
    assert cls.load([], {variable: "from-env"}).control_token_value() == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert cls.load([f"--control-token-file={token_file}"], {}).control_token_value() == "from-file"
    with pytest.raises(SettingsError) as missing:
        cls.load([f"--control-token-file={tmp_path / 'absent'}"], {}).control_token_value()
    assert str(missing.value) == f"cannot read the control token file {tmp_path / 'absent'}: No such file or directory"
    with pytest.raises(SettingsError) as both:
        cls.load([f"--control-token-file={token_file}"], {variable: "from-env"})
    assert "must be empty when --control-token-file is set" in str(both.value) and "from-env" not in str(both.value)
    assert "from-env" not in repr(cls.load([], {variable: "from-env"}))


@pytest.mark.parametrize(("cls", "needed"), [(ServerSettings, "--tls-cert-file"), (MonitorSettings, "--control-tls")])
def test_a_control_port_off_loopback_needs_tls_too(cls: type[Settings], needed: str) -> None:
    with pytest.raises(SettingsError) as caught:
        cls.load(["--control-address=10.0.0.5:50052"], {cls.env_name("control_token"): "s3cret"})
    assert str(caught.value) == (f"invalid --control-address / {cls.env_name('control_address')}: must be loopback "
                                 f"unless {needed} is set, got '10.0.0.5:50052'")
