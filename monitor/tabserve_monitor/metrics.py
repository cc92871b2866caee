"""Prometheus metrics of the monitor: a public interface (alert rules and dashboards use these names)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["PREFIX", "MonitorMetrics"]

PREFIX = "tabserve_monitor_"


class MonitorMetrics:
    """All monitor metrics, registered on one registry (tests pass a fresh `CollectorRegistry`)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.collector_registry = registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=registry)

        self.registry_up = gauge("registry_up", "1 when the last registry poll succeeded.")
        self.poll_duration = Histogram(
            PREFIX + "poll_duration_seconds", "Duration of one registry resolution.", registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.polls = Counter(PREFIX + "polls", "Polls by result: success, registry_error, server_error.",
                             ["result"], registry=registry)
        self.last_successful_poll = gauge(
            "last_successful_poll_timestamp_seconds", "Unix time of the last poll that resolved the registry."
        )
        self.target_version = gauge("target_version", "Version the registry says should be served (0: none).")
        self.served_version = gauge("served_version", "Version the server reports serving (0: none or unknown).")
        self.served_version_lag = gauge(
            "served_version_lag_seconds", "How long the served version has differed from the target (0 when equal)."
        )
        self.reloads = Counter(PREFIX + "reloads", "Reloads observed on the server, by result: success, failure.",
                               ["result"], registry=registry)
        self.server_up = gauge("server_up", "1 when the server's grpc.health.v1 Check answers SERVING.")
        self.canary_up = gauge("canary_up", "1 when the last canary Score request on the public port succeeded.")
        self.canary_requests = Counter(
            PREFIX + "canary_requests",
            "Canary Score requests (one all-missing row), by result: success, failure, shed (refused for load).",
            ["result"], registry=registry,
        )
        self.canary_duration = Histogram(
            PREFIX + "canary_duration_seconds", "Round trip of one canary Score request, as a client sees it.",
            registry=registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.control_up = gauge("control_up", "1 when the last control call (SetAspiredVersion, GetStatus) succeeded.")
        self.target_ambiguous = gauge("target_ambiguous", "1 when the followed stage holds more than one version.")
        self.alias_dangling = gauge(
            "alias_dangling", "1 when the alias is missing or points at a deleted version (nothing is stated)."
        )
        self.model_missing = gauge("registered_model_missing", "1 when the registered model does not exist.")
        self.target_not_ready = gauge("target_not_ready", "1 when the target version's status is not READY.")
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for result in ("success", "failure", "shed"):
            self.canary_requests.labels(result)
        for result in ("success", "registry_error", "server_error"):
            self.polls.labels(result)
