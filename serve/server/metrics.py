"""Prometheus text-format metrics for the adapter server, hand-rolled: a few counters, gauges and histograms.

Per process: each worker keeps its own figures (the server is otherwise stateless), so scrape each worker,
or run one worker per container. Label values are fixed strings chosen by the server, never request data, so
nothing a client or the vendor sends (and never the vendor key) reaches the metrics. The one exception is
the ``adapter`` label of a multi-adapter server: a name from the server's own adapter folder, and only the
first ``top_n`` names that get traffic have their own; the rest share ``other``, so a server with thousands
of adapters still exports a bounded number of series (and a counter never changes label under a scraper).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LabelValues = tuple[str, ...]


def _labels(names: Sequence[str], values: LabelValues, extra: str = "") -> str:
    parts = [f'{n}="{v}"' for n, v in zip(names, values, strict=True)] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(label_names)
        self._lock = threading.Lock()

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` to the count for ``labels``."""
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        """The current count for ``labels``."""
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        """Text-format lines."""
        with self._lock:
            items = sorted(self._values.items()) or ([((), 0.0)] if not self.label_names else [])
        return self._header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down (no labels)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.value = 0.0

    def add(self, amount: float) -> None:
        """Add ``amount`` (negative to subtract)."""
        with self._lock:
            self.value += amount

    def set(self, value: float) -> None:
        """Set the value."""
        self.value = value

    def render(self) -> list[str]:
        """Text-format lines."""
        return self._header() + [f"{self.name} {_number(self.value)}"]


class Histogram(_Metric):
    """Observations in cumulative buckets, with their sum and count, per label set."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, label_names)
        self.buckets = tuple(buckets)
        self._series: dict[LabelValues, list[float]] = {}  # bucket counts..., +Inf count, sum

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation."""
        with self._lock:
            row = self._series.setdefault(labels, [0.0] * (len(self.buckets) + 2))
            row[bisect_left(self.buckets, value)] += 1  # the first bucket whose bound is >= value
            row[-1] += value

    def render(self) -> list[str]:
        """Text-format lines."""
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        lines = self._header()
        for labels, row in items:
            running = 0.0
            for bound, count in zip((*map(_number, self.buckets), "+Inf"), row[:-1], strict=True):
                running += count
                le = 'le="' + bound + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, labels, le)} {_number(running)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_number(row[-1])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {_number(running)}")
        return lines


class ServerMetrics:
    """Every figure the adapter server exports."""

    def __init__(self) -> None:
        p = "craft_adapter"
        self.requests = Counter(f"{p}_requests_total", "HTTP requests answered, by endpoint and status.",
                                ("endpoint", "status"))
        self.latency = Histogram(f"{p}_request_duration_seconds", "Time to answer a request, by endpoint.",
                                 ("endpoint",))
        self.in_flight = Gauge(f"{p}_requests_in_flight", "Requests being answered now.")
        self.images = Counter(f"{p}_images_classified_total", "Images given a refined answer.")
        self.vendor_calls = Counter(f"{p}_vendor_calls_total", "Calls sent to the vendor, by outcome.", ("outcome",))
        self.vendor_errors = Counter(f"{p}_vendor_errors_total",
                                     "Client requests failed because of the vendor, by error type.", ("type",))
        self.vendor_retries = Counter(f"{p}_vendor_retries_total", "Vendor calls retried after a failure.")
        self.vendor_latency = Histogram(f"{p}_vendor_call_duration_seconds", "Time of one vendor call.")
        self.vendor_in_flight = Gauge(f"{p}_vendor_calls_in_flight", "Vendor calls open now.")

        self.adapters: AdapterMetrics | None = None

    def render(self) -> str:
        """The whole exposition, Prometheus text format 0.0.4."""
        metrics = [self.requests, self.latency, self.in_flight, self.images, self.vendor_calls, self.vendor_errors,
                   self.vendor_retries, self.vendor_latency, self.vendor_in_flight]
        if self.adapters is not None:
            metrics += self.adapters.all()
        return "\n".join(line for m in metrics for line in m.render()) + "\n"


class AdapterMetrics:
    """Per-adapter figures of a multi-adapter server, with the ``adapter`` label bounded to ``top_n`` names."""

    def __init__(self, top_n: int = 50) -> None:
        p = "craft_adapter_adapter"
        self.top_n, self._named, self._lock = top_n, set[str](), threading.Lock()
        self.requests = Counter(f"{p}_requests_total", "Requests by adapter (first top_n names seen, then "
                                "'other') and outcome ('ok' or the error type).", ("adapter", "outcome"))
        self.latency = Histogram(f"{p}_request_duration_seconds", "Time to answer, by adapter.", ("adapter",))
        self.images = Counter(f"{p}_images_classified_total", "Images answered, by adapter.", ("adapter",))
        self.events = Counter(f"{p}_events_total", "Store events: load, evict, reload, by outcome.",
                              ("event", "outcome"))
        self.known = Gauge(f"{p}s_known", "Adapters with a current version.")
        self.loaded = Gauge(f"{p}s_loaded", "Adapter versions loaded now.")
        self.loaded_bytes = Gauge(f"{p}s_loaded_bytes", "Estimated memory of the loaded adapter versions.")

    def label(self, name: str) -> str:
        """``name`` if it has (or now gets) one of the ``top_n`` label slots, else ``other``."""
        if name in self._named:
            return name
        with self._lock:
            if len(self._named) < self.top_n:
                self._named.add(name)
                return name
        return "other"

    def observe_store(self, known: int, loaded: int, loaded_bytes: int) -> None:
        """Set the store gauges (read at scrape time)."""
        self.known.set(known)
        self.loaded.set(loaded)
        self.loaded_bytes.set(loaded_bytes)

    def all(self) -> list[_Metric]:
        """Every metric, for rendering."""
        return [self.requests, self.latency, self.images, self.events, self.known, self.loaded, self.loaded_bytes]
