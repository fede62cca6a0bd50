"""A small Prometheus registry: counters, histograms and callback gauges in the text format."""

from __future__ import annotations

import threading
from typing import Callable

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800)
OCCUPANCY_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {}
        self._histograms: dict[str, tuple[tuple, dict[tuple, list]]] = {}
        self._gauges: dict[str, Callable[[], dict[tuple, float]]] = {}
        self._help: dict[str, tuple[str, str]] = {}

    def has(self, name: str) -> bool:
        return name in self._help

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = ("counter", help_text)
        self._counters[name] = {}

    def histogram(self, name: str, help_text: str, buckets: tuple) -> None:
        self._help[name] = ("histogram", help_text)
        self._histograms[name] = (buckets, {})

    def gauge(self, name: str, help_text: str, read: Callable[[], dict[tuple, float]]) -> None:
        """`read` returns {label tuple: value}; label tuples are ((key, value), ...)."""
        self._help[name] = ("gauge", help_text)
        self._gauges[name] = read

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._counters[name][key] = self._counters[name].get(key, 0.0) + amount

    def observe(self, name: str, value: float, **labels) -> None:
        buckets, series = self._histograms[name]
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts = series.setdefault(key, [0] * len(buckets) + [0, 0.0])  # bucket counts, +Inf count, sum
            for i, bound in enumerate(buckets):
                if value <= bound:
                    counts[i] += 1
            counts[-2] += 1
            counts[-1] += value

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_text) in self._help.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    lines += [f"{name}{_labels(dict(k))} {v:g}" for k, v in self._counters[name].items()]
                elif kind == "histogram":
                    lines += self._render_histogram(name)
                else:
                    lines += [f"{name}{_labels(dict(k))} {v:g}" for k, v in self._gauges[name]().items()]
        return "\n".join(lines) + "\n"

    def _render_histogram(self, name: str) -> list[str]:
        buckets, series = self._histograms[name]
        lines = []
        for key, counts in series.items():
            labels = dict(key)
            for bound, count in zip(buckets, counts):
                lines.append(f"{name}_bucket{_labels({**labels, 'le': f'{bound:g}'})} {count}")
            lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {counts[-2]}")
            lines.append(f"{name}_count{_labels(labels)} {counts[-2]}")
            lines.append(f"{name}_sum{_labels(labels)} {counts[-1]:g}")
        return lines
