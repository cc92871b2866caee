"""Entry point of the server process: `python -m tabserve_server` or `tabserve-server`."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from tabserve_common.address import unavailable_address
from tabserve_server.app import ServingApp
from tabserve_server.logs import configure_logging
from tabserve_server.settings import ServerSettings
from tabserve_server.supervisor import Supervisor


def main(argv: Sequence[str] | None = None) -> int:
    settings = ServerSettings.load_or_exit(argv)
    configure_logging(settings, "server" if settings.workers == 1 else "supervisor")
    # A busy port is one clear line before anything starts (gRPC's own bind failure is a C++ log line).
    listeners = [settings.address, settings.control_address, settings.metrics_address, settings.health_address]
    problem = unavailable_address(a for a in listeners if a)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    try:
        app: ServingApp | Supervisor = ServingApp(settings) if settings.workers == 1 else Supervisor(settings)
        app.start()
    except (ValueError, RuntimeError, OSError) as exc:  # OSError: a TLS file that cannot be read or loaded
        logging.getLogger("tabserve_server").error("cannot start: %s", exc)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # One machine-readable line, so scripts and tests that bind port 0 learn the ports.
    print(json.dumps({"event": "listening", "public_port": app.public_port, "control_port": app.control_port,
                      "metrics_port": app.metrics_port, "health_port": app.health_port}), flush=True)
    while not stop.wait(0.5):
        pass
    app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
