"""The supervisor's /metrics: the workers' own endpoints scraped and merged at scrape time, with the counters of
replaced workers carried over so the sums stay monotonic across restarts (see docs/architecture.md)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tabserve_server.metrics import PREFIX

SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]  # family, sample name, sorted labels

# How each gauge of the workers combines into the server's one value; counters and histograms add up.
_GAUGE_MERGE: dict[str, Callable[[list[float]], float]] = {
    PREFIX + "requests_in_flight": sum,
    PREFIX + "requests_waiting": sum,
    PREFIX + "decision_log_queue_depth": sum,
    PREFIX + "serving": min,
    PREFIX + "model_load_failing": max,
}
_CUMULATIVE = {"counter", "histogram", "summary"}
_OWN = {PREFIX + "workers", PREFIX + "worker_restarts"}  # the supervisor reports these itself


@dataclass(frozen=True)
class Scrape:
    """One worker's /metrics text (None when it did not answer), with the pid it came from."""

    index: int
    pid: int
    text: str | None


class CarryOver:
    """The last cumulative samples scraped from each worker slot, and the totals of the processes replaced
    since: a restarted worker starts its counters at 0, and the supervisor's sums must not go down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scraped: dict[int, tuple[int, dict[SampleKey, float]]] = {}
        self._retired: dict[SampleKey, float] = {}

    def record(self, index: int, pid: int, samples: dict[SampleKey, float]) -> None:
        """Keep counters monotonic across restarts: a replaced worker's last scraped totals are carried over."""
        with self._lock:
            previous = self._scraped.get(index)
            if previous is not None and previous[0] != pid:
                for key, value in previous[1].items():
                    self._retired[key] = self._retired.get(key, 0.0) + value
            self._scraped[index] = (pid, samples)

    def retired(self) -> dict[SampleKey, float]:
        with self._lock:
            return dict(self._retired)


def merge(scrapes: list[Scrape], carry: CarryOver) -> list[Metric]:
    """The workers' metric families combined into one set (counters and histograms summed, gauges by meaning),
    the carried-over totals of replaced workers added; records this scrape's counters in `carry`."""
    families: dict[str, tuple[str, str]] = {}  # name -> documentation, type
    values: dict[SampleKey, list[float]] = {}
    for scrape in scrapes:
        if scrape.text is None:
            continue
        cumulative: dict[SampleKey, float] = {}
        for family in text_string_to_metric_families(scrape.text):
            if family.name in _OWN:
                continue
            families.setdefault(family.name, (family.documentation, family.type))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                values.setdefault(key, []).append(sample.value)
                if family.type in _CUMULATIVE:
                    cumulative[key] = sample.value
        carry.record(scrape.index, scrape.pid, cumulative)
    for key, value in carry.retired().items():
        if key[0] in families:
            values.setdefault(key, []).append(value)
    metrics = {name: Metric(name, doc, typ) for name, (doc, typ) in families.items()}
    for (name, sample_name, labels), found in values.items():
        if name not in metrics:
            continue
        combine = sum if metrics[name].type in _CUMULATIVE else _GAUGE_MERGE.get(name, max)
        metrics[name].add_sample(sample_name, dict(labels), float(combine(found)))
    return sorted(metrics.values(), key=lambda m: m.name)


class WorkerMetrics:
    """Collector of the supervisor's /metrics: `scrape()` fetches every worker's text at collect time."""

    def __init__(self, scrape: Callable[[], list[Scrape]], workers_up: Callable[[], int],
                 restarts: Callable[[], int]) -> None:
        self._scrape = scrape
        self._workers_up = workers_up
        self._restarts = restarts
        self._carry = CarryOver()

    def collect(self) -> Iterator[Metric]:
        yield from merge(self._scrape(), self._carry)
        yield GaugeMetricFamily(PREFIX + "workers", "Worker processes up (1 for a single process).",
                                value=self._workers_up())
        yield CounterMetricFamily(PREFIX + "worker_restarts",
                                  "Worker processes restarted by the supervisor after they died.",
                                  value=self._restarts())
