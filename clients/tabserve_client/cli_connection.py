"""The CLI's connection flags (TLS, load balancing, keepalive) and the `ScoringClient` arguments they make."""

from __future__ import annotations

import argparse
from typing import Any

from tabserve_client.channel import Keepalive, TlsOptions
from tabserve_client.client import LOAD_BALANCING_POLICIES


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--tls", action="store_true",
        help="speak TLS, trusting the system's CA certificates (implied by the four options below)",
    )
    group.add_argument("--ca-file", metavar="PEM", help="CA certificates that verify the server's certificate")
    group.add_argument(
        "--cert-file", metavar="PEM", help="client certificate chain, for a server that requires mutual TLS",
    )
    group.add_argument("--key-file", metavar="PEM", help="private key of --cert-file")
    group.add_argument(
        "--server-name", metavar="NAME",
        help="name the server's certificate must carry, when not the target's host (e.g. a target given by IP)",
    )
    group.add_argument(
        "--load-balancing", choices=LOAD_BALANCING_POLICIES, default="pick_first",
        help="round_robin spreads calls over every address the target resolves to, e.g. "
        "dns:///NAME:PORT of a headless Service (default: pick_first, one connection)",
    )
    group.add_argument(
        "--keepalive-seconds", type=float, metavar="SECONDS",
        help="send a keepalive ping every SECONDS on a quiet connection (default: none)",
    )


def connection_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """`ScoringClient` keyword arguments from the flags; ValueError says which flags do not fit together."""
    files = (args.ca_file, args.cert_file, args.key_file, args.server_name)
    tls = None
    if args.tls or any(files):
        if bool(args.cert_file) != bool(args.key_file):
            raise ValueError("--cert-file and --key-file go together")
        tls = TlsOptions(*(value or "" for value in files))
    keepalive = None
    if args.keepalive_seconds is not None:
        try:
            keepalive = Keepalive(interval_seconds=args.keepalive_seconds)
        except ValueError:
            raise ValueError(f"--keepalive-seconds must be a positive number, got {args.keepalive_seconds}") from None
    return {"tls": tls, "keepalive": keepalive, "load_balancing": args.load_balancing}
