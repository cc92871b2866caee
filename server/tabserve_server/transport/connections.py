"""gRPC arguments of the public listener's connections: the keepalive policy it enforces and the connection age.

The keepalive policy decides which client pings the server tolerates: gRPC's own defaults (pings at most every
5 minutes, and one per 2 hours on a connection with no call in flight) answer a client that pings every 10 s
with GOAWAY `too_many_pings`. The connection age makes every client reconnect now and then (gRPC adds +/-10 %
jitter to it, so connections made together do not all move at once), which is how long-lived connections find
new replicas behind a Service and the other SO_REUSEPORT workers of this one.
"""

from __future__ import annotations

from tabserve_server.settings import ServerSettings


def _milliseconds(seconds: float) -> int:
    return round(seconds * 1000)


def connection_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """Channel arguments of the public server for `settings`' keepalive policy and connection age."""
    options = [
        ("grpc.http2.min_ping_interval_without_data_ms", _milliseconds(settings.keepalive_min_ping_interval_seconds)),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        ("grpc.http2.max_ping_strikes", settings.keepalive_max_ping_strikes),
    ]
    if settings.max_connection_age_seconds > 0:  # gRPC's default is no limit; 0 ms would mean "at once"
        options += [
            ("grpc.max_connection_age_ms", max(1, _milliseconds(settings.max_connection_age_seconds))),
            ("grpc.max_connection_age_grace_ms", _milliseconds(settings.max_connection_age_grace_seconds)),
        ]
    return options
