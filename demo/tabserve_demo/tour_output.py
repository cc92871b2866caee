"""What the `make demo` tour prints and how it waits: step headers, indented details, bounded polls, /metrics."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import Final, TypeVar

from prometheus_client.parser import text_string_to_metric_families

STEPS: Final = 9

T = TypeVar("T")


class TourError(Exception):
    """A step of the tour failed; the message says what was expected."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(number: int, title: str) -> None:
    say(f"\n[{number}/{STEPS}] {title}")


def detail(text: str) -> None:
    say(f"      {text}")


def wait_until(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `condition` until it returns something other than None/False; TourError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TourError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def read_metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of a process's /metrics on loopback; None when absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def metric_or_none(port: int, name: str, **labels: str) -> float | None:
    """read_metric, or None while the process does not answer."""
    try:
        return read_metric(port, name, **labels)
    except OSError:
        return None
