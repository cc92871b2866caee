"""Entry point of the monitor process: `python -m tabserve_monitor` or `tabserve-monitor`."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from tabserve_common.logs import configure_logging
from tabserve_common.settings import SettingsError
from tabserve_monitor.endpoint import start_endpoint
from tabserve_monitor.loop import Monitor
from tabserve_monitor.settings import MonitorSettings


def main(argv: Sequence[str] | None = None) -> int:
    settings = MonitorSettings.load_or_exit(argv)
    configure_logging(settings.log_level, settings.log_format, "monitor")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        monitor = Monitor(settings)
        metrics_server = start_endpoint(settings, monitor.state)
    except SettingsError as exc:
        logging.getLogger("tabserve_monitor").error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        logging.getLogger("tabserve_monitor").error("cannot listen on %s: %s", settings.metrics_address, exc)
        return 2
    # One machine-readable line, so scripts and tests that bind port 0 learn the port.
    print(json.dumps({"event": "listening", "metrics_port": metrics_server.server_port}), flush=True)
    # The loop runs in a daemon thread: a signal ends the process at once, even mid-poll.
    worker = threading.Thread(target=monitor.run, args=(stop,), name="monitor-loop", daemon=True)
    worker.start()
    while not stop.wait(0.5):
        if not worker.is_alive():
            return 1
    metrics_server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
