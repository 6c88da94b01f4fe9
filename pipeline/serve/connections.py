"""Connections under abuse: a cap with shedding of idle connections, header timeouts, quiet accept errors.

uvicorn on its own keeps a connection that never sends a request open forever (its
keep-alive timer is armed only after a first response) and resets that timer on
every byte, so thousands of half-open or trickling connections exhaust the file
descriptors, after which every accept fails and asyncio logs a traceback for each.
`build_server` returns a uvicorn server whose HTTP protocol (uvicorn's h11 one,
subclassed) closes a connection that has not sent complete request headers within
`header_timeout` of connecting or of its last response, and keeps at most
`max_connections` open by closing the connections idle the longest (no request in
flight) to make room for a new one. Limits and their defaults: docs/SERVE.md.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import resource
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.serve.limits import DEFAULT_KEEP_ALIVE_TIMEOUT

log = logging.getLogger(__name__)

# File descriptors kept for everything but client connections (index, model, logs, temp files).
RESERVED_FDS = 128
_ACCEPT_ERRORS = ("socket.accept() out of system resource", "Error on transport creation for incoming connection")


class RateLimitedLog:
    """Logs an event at most once per `interval` seconds, with how often it happened since the last line."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self.count = 0
        self.total = 0
        self._last = -float("inf")

    def __call__(self, message: str, *args: Any) -> None:
        """Count one occurrence; log `message % args` with the count if the interval has passed."""
        self.count += 1
        self.total += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            self.logger.log(self.level, f"{message} ({self.count} times in the last {self.interval:g} s)", *args)
            self.count = 0
            self._last = now


class ConnectionGuard:
    """The shared state of one server's connections: the cap, the timeout, who is open, what was closed."""

    def __init__(self, max_connections: int, header_timeout: float) -> None:
        """Args: max_connections: most open connections; header_timeout: seconds to send request headers."""
        if max_connections < 1 or header_timeout <= 0:
            raise ValueError("max_connections and header_timeout must be positive")
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        # Open connections, least recently active first (connected, or request started or answered).
        self.open: collections.OrderedDict[GuardedH11Protocol, None] = collections.OrderedDict()
        self.shed = 0
        self.refused = 0
        self.header_timeouts = 0
        self.log_shed = RateLimitedLog(log, logging.WARNING)
        self.log_refused = RateLimitedLog(log, logging.WARNING)

    def oldest_idle(self) -> GuardedH11Protocol | None:
        """The open connection idle the longest, or None when every one has a request in flight."""
        for connection in self.open:
            if connection.idle:
                return connection
        return None

    def stats(self) -> dict:
        """Counts for logs and /stats."""
        return {
            "open": len(self.open),
            "max_connections": self.max_connections,
            "header_timeout_s": self.header_timeout,
            "shed_idle": self.shed,
            "refused_all_busy": self.refused,
            "header_timeouts": self.header_timeouts,
        }


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a cap on open connections (see module doc)."""

    guard: ConnectionGuard  # set on the subclass build_server makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """True when no request is in flight (none yet, or the last one answered)."""
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Register the connection, closing the longest-idle ones if it would go over the cap."""
        super().connection_made(transport)
        guard = self.guard
        while len(guard.open) >= guard.max_connections:
            victim = guard.oldest_idle()
            if victim is None:
                break
            victim.close_idle()
            guard.shed += 1
            guard.log_shed(
                "%d connections open (--max-connections): closed the one idle the longest to let a new one in",
                len(guard.open) + 1,
            )
        if len(guard.open) >= guard.max_connections:
            # Every open connection has a request in flight: there is nothing idle to give up.
            guard.refused += 1
            guard.log_refused("%d connections open, all busy (--max-connections): refused a new one", len(guard.open))
            transport.close()
            return
        guard.open[self] = None
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        self.guard.open.pop(self, None)
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        """Parse what arrived; complete headers stop the header timer and mark the connection busy."""
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # complete request headers arrived: a request is in flight
            self._cancel_header_timer()
            if self in self.guard.open:
                self.guard.open.move_to_end(self)

    def on_response_complete(self) -> None:
        """After an answer the connection is idle again: the next request's headers are timed from now."""
        super().on_response_complete()
        if self.idle and not self.transport.is_closing():
            # The next request's headers get the same time as the first one's, however they trickle in.
            self._arm_header_timer()
            if self in self.guard.open:
                self.guard.open.move_to_end(self)

    def close_idle(self) -> None:
        """Close this idle connection now (to make room for a new one)."""
        self.guard.open.pop(self, None)
        self._cancel_header_timer()
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.guard.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.idle and not self.transport.is_closing():
            self.guard.header_timeouts += 1
            self.close_idle()


class _QuietRepeats(logging.Filter):
    """Lets uvicorn's per-request warnings about bad clients through once per interval, with a count.

    A client can provoke them at will (malformed requests, upgrade headers), one line each.
    """

    _MESSAGES = ("Invalid HTTP request received.", "Unsupported upgrade request.", "No supported WebSocket library")

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}
        self._counts: collections.Counter[str] = collections.Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass other records; pass a repeated warning once per interval, with its count."""
        text = record.getMessage()
        key = next((m for m in self._MESSAGES if text.startswith(m)), None)
        if key is None:
            return True
        self._counts[key] += 1
        now = time.monotonic()
        if now - self._last.get(key, -float("inf")) < self.interval:
            return False
        record.msg, record.args = f"{text} ({self._counts.pop(key)} times in the last {self.interval:g} s)", ()
        self._last[key] = now
        return True


class _AcceptErrorHandler:
    """The event loop's exception handler: accept failures (EMFILE, ENFILE, ENOBUFS) once per interval.

    When the failure is for want of a file descriptor, the connection idle the longest
    is closed too, so the next try (asyncio retries a second later) can succeed.
    """

    def __init__(self, guard: ConnectionGuard, interval: float = 10.0) -> None:
        self.guard = guard
        self.log = RateLimitedLog(log, logging.ERROR, interval)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        message = context.get("message", "")
        if not message.startswith(_ACCEPT_ERRORS):
            loop.default_exception_handler(context)
            return
        exc = context.get("exception")
        if getattr(exc, "errno", None) in (errno.EMFILE, errno.ENFILE):
            victim = self.guard.oldest_idle()
            if victim is not None:
                victim.close_idle()
                self.guard.shed += 1
        self.log(
            "cannot accept a connection: %s; %d connections open; raise the open-files limit (ulimit -n) "
            "or lower --max-connections",
            exc,
            len(self.guard.open),
        )


class GuardedServer(uvicorn.Server):
    """A uvicorn server whose event loop logs accept errors once per interval, not once per failure."""

    guard: ConnectionGuard

    async def startup(self, sockets: list | None = None) -> None:
        """Install the accept-error handler on the running loop, then start as uvicorn does."""
        asyncio.get_running_loop().set_exception_handler(_AcceptErrorHandler(self.guard))
        await super().startup(sockets=sockets)


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
        return soft
    return target


def plan_connections(requested: int, fd_limit: int) -> tuple[int, int]:
    """(max_connections, listen backlog) that fit in `fd_limit` open files.

    Connections accepted in one burst are open before the oldest idle ones are
    closed, so the backlog (asyncio accepts up to that many at once) needs room too.
    """
    usable = max(64, fd_limit - RESERVED_FDS)
    backlog = max(16, min(1024, usable // 4))
    return max(1, min(requested, usable - backlog)), backlog


def build_server(
    app: Any,
    guard: ConnectionGuard,
    *,
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
    backlog: int = 1024,
    log_level: str = "info",
) -> GuardedServer:
    """A uvicorn server for `app` whose connections `guard` limits (run it with `server.run(sockets=[...])`)."""
    protocol = type("EmbedpipeH11Protocol", (GuardedH11Protocol,), {"guard": guard})
    config = uvicorn.Config(
        app,
        http=protocol,
        ws="none",
        lifespan="on",
        log_level=log_level,
        timeout_keep_alive=keep_alive_timeout,
        # A backstop only: shedding keeps connections (and so requests in flight) under the cap.
        limit_concurrency=guard.max_connections + 64,
        backlog=backlog,
        timeout_graceful_shutdown=5,
    )
    server = GuardedServer(config)
    server.guard = guard
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietRepeats) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_QuietRepeats())
    return server
