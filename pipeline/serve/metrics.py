"""The server's metrics in the Prometheus text exposition format (version 0.0.4), for GET /metrics.

A small exact writer rather than `prometheus_client`: the server needs three counters,
one histogram and a few gauges read at scrape time, each app keeps its own (tests run
several apps in one process, which the library's global registry would merge), and
the `[serve]` extra stays at FastAPI + uvicorn. tests/test_serve_api.py parses the
output with a parser written from the format's specification.

What is measured, and the names: docs/SERVE.md.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The JSON error code of a response, put into the request's scope by whoever answers with an error.
ERROR_KEY = "embedpipe.error"
# Seconds; from an id query on a small index (~1 ms) to an image query that waited for decode memory.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Requests that match no route share one label, so that random paths cannot grow the label set.
OTHER_ENDPOINT = "other"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

Sample = tuple[str, dict[str, str], float]  # (name with its suffix, labels, value)

KNOWN_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})


def format_value(value: float) -> str:
    """A sample value as the format writes it: integers without a fraction, +Inf, -Inf, NaN."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _bound(value: float) -> str:
    # `le` is a label: the same bound must always be spelled the same (Go's formatting: 1.0, 0.005, +Inf).
    return "+Inf" if math.isinf(value) else repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class Family:
    """One metric family: a name, a help text, a type and the label names its samples carry."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        """Args: name: the metric name (a counter's ends in _total); help: one line; labels: label names."""
        if not _NAME.match(name) or not all(_LABEL.match(label) and label != "le" for label in labels):
            raise ValueError(f"invalid metric or label name in {name}{tuple(labels)}")
        self.name = name
        self.help = help
        self.labels = tuple(labels)

    def _labels(self, values: Sequence[Any]) -> tuple[str, ...]:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}; got {tuple(values)}")
        return tuple(str(v) for v in values)

    def samples(self) -> Iterator[Sample]:
        """The family's samples now."""
        return iter(())


class Counter(Family):
    """A monotonic count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: Any, amount: float = 1) -> None:
        """Add `amount` (>= 0) to the count of this label set."""
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._labels(labels)
        self.values[key] = self.values.get(key, 0) + amount

    def samples(self) -> Iterator[Sample]:
        """One sample per label set seen."""
        for key, value in sorted(self.values.items()):
            yield self.name, dict(zip(self.labels, key)), value


class Gauge(Family):
    """A value read when the metrics are written: `read()` returns a number or (label values, number) pairs."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        read: Callable[[], float | Iterable[tuple[Sequence[Any], float]] | None],
        labels: Sequence[str] = (),
    ) -> None:
        """Args: name, help, labels: as for every family; read: called at each scrape."""
        super().__init__(name, help, labels)
        self.read = read

    def samples(self) -> Iterator[Sample]:
        """The value(s) now; nothing when `read()` returns None."""
        value = self.read()
        if value is None:
            return
        if isinstance(value, (int, float)):
            yield self.name, {}, float(value)
            return
        for labels, number in value:
            yield self.name, dict(zip(self.labels, self._labels(labels))), float(number)


class Histogram(Family):
    """Observations counted into cumulative buckets, with their sum and count, per label set."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()) -> None:
        super().__init__(name, help, labels)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds != sorted(set(bounds)):
            raise ValueError("a histogram needs distinct bucket bounds")
        self.bounds = bounds if math.isinf(bounds[-1]) else [*bounds, math.inf]
        self.values: dict[tuple[str, ...], list[float]] = {}  # per-bucket counts (not cumulative), sum, count

    def observe(self, value: float, *labels: Any) -> None:
        """Count one observation of `value`."""
        key = self._labels(labels)
        row = self.values.setdefault(key, [0.0] * (len(self.bounds) + 2))
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                row[i] += 1
                break
        row[-2] += value
        row[-1] += 1

    def samples(self) -> Iterator[Sample]:
        """_bucket samples (cumulative, le ending at +Inf), then _sum and _count, per label set."""
        for key, row in sorted(self.values.items()):
            labels = dict(zip(self.labels, key))
            running = 0.0
            for bound, count in zip(self.bounds, row):
                running += count
                yield f"{self.name}_bucket", {**labels, "le": _bound(bound)}, running
            yield f"{self.name}_sum", labels, row[-2]
            yield f"{self.name}_count", labels, row[-1]


def render(families: Iterable[Family]) -> str:
    """The families in the text format: HELP and TYPE lines, then the samples, one per line."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for name, labels, value in family.samples():
            text = ",".join(f'{key}="{_escape_label(v)}"' for key, v in labels.items())
            lines.append(f"{name}{{{text}}} {format_value(value)}" if text else f"{name} {format_value(value)}")
    return "\n".join(lines) + "\n"


class RequestMetrics:
    """What the HTTP layer counts: requests, their latency, errors by code, queries by type, requests in flight."""

    def __init__(self) -> None:
        self.requests = Counter(
            "embedpipe_http_requests_total", "HTTP requests answered, by method, endpoint and status.",
            ("method", "endpoint", "status"),
        )  # fmt: skip
        self.latency = Histogram(
            "embedpipe_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response, by method and endpoint.",
            ("method", "endpoint"),
            LATENCY_BUCKETS,
        )
        self.errors = Counter(
            "embedpipe_http_errors_total", "Error responses by their JSON error code (http_STATUS if none).", ("code",)
        )
        self.queries = Counter(
            "embedpipe_search_queries_total", "Search queries answered, by type (a batch counts each query).", ("type",)
        )
        self.in_flight = 0

    def families(self) -> list[Family]:
        """The families this object keeps (the app adds its gauges)."""
        in_flight = Gauge(
            "embedpipe_http_requests_in_flight", "HTTP requests being answered now.", lambda: self.in_flight
        )
        return [self.requests, self.latency, self.errors, self.queries, in_flight]

    def record(self, method: str, endpoint: str, status: int, code: str | None, seconds: float) -> None:
        """Count one answered request."""
        self.requests.inc(method, endpoint, status)
        self.latency.observe(seconds, method, endpoint)
        if status >= 400:
            self.errors.inc(code or f"http_{status}")


def endpoint_of(scope: Scope, routes: Sequence[Any]) -> str:
    """The route template a request belongs to (`/thumbnail/{id}`), whatever its method; OTHER_ENDPOINT if none."""
    route = scope.get("route")
    if route is None:  # answered before routing (a CORS preflight) or by no route (404)
        for candidate in routes:
            match, _ = candidate.matches(scope)
            if match != Match.NONE:
                route = candidate
                break
    if route is None:
        return OTHER_ENDPOINT
    return getattr(route, "path_format", None) or getattr(route, "path", OTHER_ENDPOINT)


class MetricsMiddleware:
    """Counts every HTTP request into `metrics` when its response has been sent (or has failed)."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics, routes: Sequence[Any]) -> None:
        """Args: app: the wrapped app; metrics: where to count; routes: the app's routes (read per request)."""
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            self.metrics.in_flight -= 1
            self.metrics.record(
                scope["method"] if scope["method"] in KNOWN_METHODS else "other",  # clients cannot add series
                endpoint_of(scope, self.routes),
                status or 500,
                scope.get(ERROR_KEY),
                time.perf_counter() - start,
            )

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted before the last byte leaves: a client that sends its next request the moment it has
                # read this answer must find this one already counted (a scrape right after a request sees it).
                record()
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, observed)
        except BaseException:
            if not status:  # Starlette's error middleware, outside this one, answers 500
                status = 500
                scope.setdefault(ERROR_KEY, "internal_error")
            raise
        finally:
            record()


class ReadCounter(Gauge):
    """A count kept elsewhere (the connection guard's), read when the metrics are written."""

    kind = "counter"


def _resident_bytes() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        return None


def server_gauges(searcher: Any, budget: Any, connection_stats: Callable[[], dict] | None) -> list[Family]:
    """Gauges of the index (size, dimension, bytes), decode memory, connections and the process's memory.

    Args:
        searcher: the open Searcher; budget: the app's DecodeBudget;
        connection_stats: ConnectionGuard.stats where the server has a guard (embedpipe serve), else None.
    """
    index_bytes = searcher.meta.get("bytes")
    families: list[Family] = [
        Gauge("embedpipe_index_vectors", "Vectors in the index (ntotal).", lambda: searcher.ntotal),
        Gauge("embedpipe_index_dimension", "Dimension of the index's vectors.", lambda: searcher.dim),
        Gauge("embedpipe_index_bytes", "Size of index.faiss in bytes, as index.json records it.", lambda: index_bytes),
        Gauge("embedpipe_decode_memory_in_use_bytes", "Decode memory held by image queries now.", lambda: budget.used),
        Gauge("embedpipe_decode_memory_budget_bytes", "Decode memory all image queries may use.", lambda: budget.total),
        Gauge("embedpipe_decode_memory_waiting", "Image queries waiting for decode memory.", lambda: budget.waiting),
        Gauge("process_resident_memory_bytes", "Resident memory of the server process.", _resident_bytes),
    ]
    if connection_stats is not None:
        for kind, name, text, key in (
            (Gauge, "embedpipe_connections_open", "Open client connections.", "open"),
            (Gauge, "embedpipe_connections_max", "Most open connections (--max-connections).", "max_connections"),
            (ReadCounter, "embedpipe_connections_shed_total", "Idle connections closed to make room for new ones.",
             "shed_idle"),
            (ReadCounter, "embedpipe_connections_refused_total",
             "Connections refused because every open one was busy.", "refused_all_busy"),
            (ReadCounter, "embedpipe_connections_header_timeouts_total",
             "Connections closed for sending headers too slowly.", "header_timeouts"),
        ):  # fmt: skip
            families.append(kind(name, text, lambda key=key: connection_stats()[key]))
    return families
