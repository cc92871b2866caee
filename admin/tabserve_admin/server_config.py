"""What the admin commands share with the server: its settings, its registry client, its control client.

The commands act as the server would, so they read the server's own settings class (`ServerSettings`): its
TABSERVE_SERVER_* variables (run them in the server's environment, e.g. `kubectl exec` into its container)
and, with `--server-flags '...'`, its command-line flags. `--tracking-uri` is a shortcut for the server's
`--tracking-uri` flag.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from tabserve_client import ControlClient, TlsOptions
from tabserve_common.mlflow_client import configure_mlflow
from tabserve_common.secrets import read_secret
from tabserve_common.settings import SettingsError
from tabserve_server.settings import ServerSettings


def add_registry_options(parser: argparse.ArgumentParser) -> None:
    """Flags of a command that reads the registry the way the server does."""
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking/registry URI (default: the server's TABSERVE_SERVER_TRACKING_URI)")
    parser.add_argument("--server-flags", default="", metavar="'FLAGS'",
                        help="the server's own flags, quoted as one argument (e.g. '--allow-schema-change "
                             "--max-model-bytes 1000000'); they win over its TABSERVE_SERVER_* variables")


def add_control_options(parser: argparse.ArgumentParser) -> None:
    """Flags of a command that calls the server's control port."""
    parser.add_argument("--control-address", default=None,
                        help="the server's control port (default: its TABSERVE_SERVER_CONTROL_ADDRESS, else "
                             "127.0.0.1:50052)")
    parser.add_argument("--control-token-file", default="",
                        help="file holding the control token (default: the server's "
                             "TABSERVE_SERVER_CONTROL_TOKEN_FILE, else TABSERVE_SERVER_CONTROL_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="speak TLS to the control port (needed off loopback)")
    parser.add_argument("--ca-file", default="", help="PEM CA that verifies the control port's certificate")
    parser.add_argument("--server-name", default="", help="name to check in the server's certificate")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of each call, in seconds (default 5)")
    parser.add_argument("--server-flags", default="", metavar="'FLAGS'", help=argparse.SUPPRESS)


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """The server's settings: TABSERVE_SERVER_* variables, then `--server-flags`, then `--tracking-uri`."""
    try:
        argv = shlex.split(args.server_flags or "")
    except ValueError as exc:
        raise SettingsError(f"--server-flags: {exc}") from None
    if getattr(args, "tracking_uri", None):
        argv += ["--tracking-uri", args.tracking_uri]
    return ServerSettings.load(argv)


def registry_client(settings: ServerSettings) -> Any:
    """An MlflowClient of the server's registry, with MLflow set up as the server sets it up (its downloads
    resolve models:/ URIs through the process-wide registry URI)."""
    from mlflow.tracking import MlflowClient

    configure_mlflow(settings.tracking_uri, settings.registry_uri, settings.registry_timeout_seconds)
    return MlflowClient(tracking_uri=settings.tracking_uri or None,
                        registry_uri=(settings.registry_uri or settings.tracking_uri) or None)


def control_client(args: argparse.Namespace, settings: ServerSettings) -> ControlClient:
    """A client of the server's control port, with the token the server requires."""
    token = read_secret("", args.control_token_file, "control token") if args.control_token_file \
        else settings.control_token_value()
    tls = TlsOptions(ca_file=args.ca_file, server_name=args.server_name) if args.tls or args.ca_file else None
    return ControlClient(args.control_address or settings.control_address, token=token, timeout=args.timeout,
                         tls=tls)


def say(text: str) -> None:
    print(text, flush=True)


def complain(text: str) -> None:
    print(f"tabserve-admin: {text}", file=sys.stderr, flush=True)
