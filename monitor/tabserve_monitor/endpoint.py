"""The monitor's HTTP listener on `metrics_address`: `/` the status page (status_page.py), every other path the
Prometheus exposition exactly as prometheus_client serves it (so `/metrics` is unchanged).

One listener, one binding, one TLS setting: prometheus_client starts it (with `metrics_cert_file`), and only
its WSGI application is wrapped. The page reads the server's score histogram from `server_metrics_url` when
it is shown (a scrape of one endpoint, bounded by a short timeout), so a page nobody opens costs nothing.
"""

from __future__ import annotations

import logging
import ssl
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from tabserve_common.address import split_address
from tabserve_monitor.settings import MonitorSettings
from tabserve_monitor.state import MonitorState
from tabserve_monitor.status_page import Bucket, render

__all__ = ["SCORE_HISTOGRAM", "read_score_histogram", "start_endpoint"]

log = logging.getLogger(__name__)

SCORE_HISTOGRAM = "tabserve_server_prediction_score"
_PAGE_FETCH_TIMEOUT = 2.0  # the page must answer even when the server's /metrics hangs

Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def read_score_histogram(url: str, ca_file: str = "", timeout: float = _PAGE_FETCH_TIMEOUT) -> list[Bucket] | None:
    """(upper bound, cumulative count) of the server's score histogram at `url`, None when unreadable."""
    if not url:
        return None
    context = ssl.create_default_context(cafile=ca_file or None) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            text = response.read().decode()
    except (OSError, ValueError) as exc:
        log.debug("status page: cannot read %s: %s", url, exc)
        return None
    for family in text_string_to_metric_families(text):
        if family.name == SCORE_HISTOGRAM:
            buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
            return sorted(buckets)
    return None


def _with_status_page(metrics_app: Wsgi, settings: MonitorSettings, state: MonitorState) -> Wsgi:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/" or environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return metrics_app(environ, start_response)
        buckets = read_score_histogram(settings.server_metrics_url, settings.tls_ca_file)
        body = render(state.snapshot(), buckets, settings.server_metrics_url).encode()
        start_response("200 OK", [
            ("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
            # Nothing on the page loads from anywhere, and nothing may.
            ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:"),
            ("Cache-Control", "no-store"),
        ])
        return [body] if environ["REQUEST_METHOD"] == "GET" else [b""]

    return app


def start_endpoint(settings: MonitorSettings, state: MonitorState) -> Any:
    """The listener, started; `.server_port` is its port, `.shutdown()` stops it. OSError when it cannot bind."""
    host, port = split_address(settings.metrics_address)
    server, _ = start_http_server(port, addr=host, certfile=settings.metrics_cert_file or None,
                                  keyfile=settings.metrics_key_file or None)
    metrics_app = server.get_app()
    assert metrics_app is not None  # start_http_server has set it
    server.set_app(_with_status_page(metrics_app, settings, state))
    return server
