"""`tabserve-admin status`: the server's GetStatus (and every worker's) in plain words, or as JSON.

Exit status 0 when the server answers, serves a version and its last load did not fail; 1 otherwise
(unreachable, nothing served, or the aspired version failing to load), so a script can gate on it.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from tabserve.control.v1 import control_pb2
from tabserve_admin import cli
from tabserve_admin.server_config import add_control_options, complain, control_client, say, server_settings
from tabserve_client import ControlError
from tabserve_common.settings import SettingsError

_STATES = {
    control_pb2.LOAD_STATE_IDLE: "idle (the aspired version is the served one)",
    control_pb2.LOAD_STATE_LOADING: "loading the aspired version",
    control_pb2.LOAD_STATE_FAILED: "FAILED: the aspired version does not load; the served one keeps serving",
    control_pb2.LOAD_STATE_STAGED: "staged (loaded and validated, waiting for the other workers)",
}


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "status", help="what the server serves, what it aspires to, how the last load went",
        description="The server's GetStatus (and each worker's) in plain words. Exit 0: serving and not failing; "
                    "1: unreachable, nothing served, or the aspired version failing to load.",
    )
    add_control_options(parser)
    parser.add_argument("--json", action="store_true", help="the GetStatus message as JSON, for scripts")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = server_settings(args)
        client = control_client(args, settings)
    except SettingsError as exc:
        complain(str(exc))
        return cli.EXIT_USAGE
    with client:
        try:
            status = client.status()
        except ControlError as exc:
            complain(f"control port {client.address} did not answer: {exc}")
            return cli.EXIT_FAILED
    if args.json:
        found = json_format.MessageToDict(status, preserving_proto_field_name=True)
        say(json.dumps({"control_address": client.address, **found}, indent=2, sort_keys=True))
    else:
        say(describe(status, client.address))
    healthy = bool(status.serving.model_name) and status.load_state != control_pb2.LOAD_STATE_FAILED
    return cli.EXIT_OK if healthy else cli.EXIT_FAILED


def describe(status: control_pb2.GetStatusResponse, address: str) -> str:
    """GetStatus in plain words, one fact a line; each worker of a multi-worker server indented below."""
    lines = [f"server (control port {address})", *_facts(status, "  ")]
    for worker in status.workers:
        state = "up" if worker.up else "NOT REACHED"
        lines.append(f"  worker {worker.index} (pid {worker.pid}, {state}, {worker.restarts} restarts)")
        if worker.up:
            lines.extend(_facts(worker.status, "    "))
    return "\n".join(lines)


def _facts(status: control_pb2.GetStatusResponse, indent: str) -> list[str]:
    served = status.serving
    if served.model_name:
        serving = (f"{served.model_name} version {served.version}, loaded from {served.loaded_from} "
                   f"({served.source_uri}) at {_when(served.loaded_at)}, digest {served.digest or '-'}")
    else:
        serving = "NOTHING (no version loaded yet)"
    aspired = status.aspired
    wanted = f"{aspired.model_name} version {aspired.version or '-'} ({aspired.model_uri})" if aspired.model_uri \
        else "nothing stated yet"
    lines = [f"serving:   {serving}", f"aspired:   {wanted}",
             f"load:      {_STATES.get(status.load_state, 'unknown')}"]
    if status.last_error:
        lines.append(f"last error: {status.last_error} (version {status.failed_version or '-'}, at "
                     f"{_when(status.last_error_at)}, {status.failed_attempts} failed attempts)")
        if status.load_state == control_pb2.LOAD_STATE_FAILED:
            lines.append(f"next attempt: {_when(status.next_attempt_at)}")
    if status.staged.model_name:
        lines.append(f"staged:    {status.staged.model_name} version {status.staged.version}")
    lines.append(f"accepting: {'yes' if status.accepting_requests else 'NO (draining or not started)'}")
    return [indent + line for line in lines]


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return datetime.fromtimestamp(stamp.ToMicroseconds() / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
