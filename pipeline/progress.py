"""Progress of a whole job, for the person who started it: done / total, img/s and ETA.

Workers count what they finish with `Tick` steps placed in the pipeline (images listed, images
done: embedded, reused or failed). How those counts reach the driver depends on the runner:

- local runners (FnApiRunner, one or several worker processes on this machine): each process
  writes its running totals to a small JSON file in a channel directory at most twice a
  second; the driver sums the files. No sockets, no shared state between processes.
- Dataflow and other remote runners: the same steps increment Beam counters, which the driver
  reads from the job's metrics while it waits.

The driver shows one `rich` progress bar on stderr when stderr is a terminal, and otherwise an
INFO log line every `every` seconds, so logs of unattended runs stay readable. The total is the
listing's count where the input is a listing (plain files); shard formats (tar, TFRecord,
Parquet, URI lists) are counted as they are read, so their total grows until reading ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

log = logging.getLogger("embedpipe")

KINDS = ("listed", "seen", "done")
_WRITE_EVERY = 0.5  # seconds between a worker's writes of its channel file


class _Reporter:
    """A worker process's running counts, written to its own file in the channel directory."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
        self.counts = dict.fromkeys(KINDS, 0)
        self.lock = threading.Lock()
        self.written = 0.0

    def add(self, kind: str, n: int) -> None:
        with self.lock:
            self.counts[kind] += n
            if time.monotonic() - self.written >= _WRITE_EVERY:
                self._write()

    def flush(self) -> None:
        with self.lock:
            self._write()

    def _write(self) -> None:
        self.written = time.monotonic()
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as out:
                json.dump(self.counts, out)
            os.replace(tmp, self.path)  # readers see the old counts or the new, never half a file
        except OSError as exc:  # progress is a courtesy: it never fails a job
            log.debug("progress file %s not written: %s", self.path, exc)


_REPORTERS: dict[str, _Reporter] = {}
_REPORTERS_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_REPORTERS.clear)  # a forked worker writes files of its own


def _reporter(directory: str) -> _Reporter:
    with _REPORTERS_LOCK:
        found = _REPORTERS.get(directory)
        if found is None:
            found = _REPORTERS[directory] = _Reporter(directory)
        return found


class _TickFn(beam.DoFn):
    def __init__(self, kind: str, channel: str | None) -> None:
        self._kind, self._channel = kind, channel

    def setup(self) -> None:
        self._counter = Metrics.counter("embedpipe", f"progress_{self._kind}")
        self._reporter = _reporter(self._channel) if self._channel else None

    def process(self, element):
        self._counter.inc()
        if self._reporter is not None:
            self._reporter.add(self._kind, 1)
        yield element

    def finish_bundle(self) -> None:
        if self._reporter is not None:
            self._reporter.flush()


def Tick(kind: str, channel: str | None) -> beam.PTransform:
    """A pass-through step that counts its elements as `kind` (listed, seen or done) for the driver's display."""
    if kind not in KINDS:
        raise ValueError(f"progress kind must be one of {KINDS}; got {kind!r}")
    return beam.ParDo(_TickFn(kind, channel))


def read_channel(directory: str) -> dict[str, int]:
    """The sum of every worker's counts in a channel directory."""
    total = dict.fromkeys(KINDS, 0)
    try:
        names = [n for n in os.listdir(directory) if n.endswith(".json")]
    except OSError:
        return total
    for name in names:
        try:
            with open(os.path.join(directory, name)) as handle:
                counts = json.load(handle)
        except (OSError, ValueError):  # replaced while read: the next poll sees it
            continue
        for kind in KINDS:
            total[kind] += int(counts.get(kind, 0))
    return total


def metrics_counts(result) -> dict[str, int]:
    """The same counts from a running job's Beam metrics (remote runners)."""
    from apache_beam.metrics.metric import MetricsFilter

    total = dict.fromkeys(KINDS, 0)
    for kind in KINDS:
        found = result.metrics().query(MetricsFilter().with_namespace("embedpipe").with_name(f"progress_{kind}"))
        for counter in found["counters"]:
            value = counter.committed if counter.committed is not None else counter.attempted
            total[kind] += int(value or 0)
    return total


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def describe(counts: dict[str, int], elapsed: float) -> str:
    """`1,234 / 5,000 images (24.7%), 11.2 img/s, ETA 5m36s` (without a total: a running count)."""
    done, total = counts["done"], max(counts["listed"], counts["seen"], counts["done"])
    rate = done / elapsed if elapsed > 0 else 0.0
    known = counts["listed"] > 0 or counts["seen"] > 0
    if not known:
        return f"{done:,} images done, {rate:.1f} img/s"
    share = f" ({100 * done / total:.1f}%)" if total else ""
    eta = f", ETA {_eta((total - done) / rate)}" if rate > 0 and total > done else ""
    return f"{done:,} / {total:,} images{share}, {rate:.1f} img/s{eta}"


class Monitor:
    """Shows a job's progress from `poll()` until stopped: a bar on a terminal, else a log line per interval."""

    def __init__(
        self,
        poll: Callable[[], dict[str, int]],
        *,
        every: float = 10.0,
        stream=None,
        tty: bool | None = None,
        label: str = "embedding",
    ) -> None:
        self._poll = poll
        self._every = every
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty() if tty is None else tty
        self._label = label
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_time = time.monotonic()
        self.last: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.final: dict[str, int] = self.last

    def __enter__(self) -> Monitor:
        self._thread = threading.Thread(target=self._run, name="embedpipe-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.final = self._poll()  # after the last worker flushed: the true totals
        except Exception as exc:  # a remote job's metrics can be unreachable; the counts come from the output
            log.debug("progress: final poll failed: %s", exc)
            self.final = self.last
        if not self._tty:  # the bar's last frame already shows it
            log.info("embedpipe progress: %s", describe(self.final, time.monotonic() - self.start_time))

    def _run(self) -> None:
        if self._tty:
            self._run_bar()
            return
        while not self._stop.wait(self._every):
            try:
                self.last = self._poll()
            except Exception as exc:  # progress never fails a job
                log.debug("progress: poll failed: %s", exc)
                continue
            log.info("embedpipe progress: %s", describe(self.last, time.monotonic() - self.start_time))

    def _run_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(file=self._stream, force_terminal=True)
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(self._label, total=None, rate="")
            while True:
                stopped = self._stop.wait(0.5)
                try:
                    self.last = counts = self._poll()
                except Exception as exc:  # progress never fails a job, nor stops showing
                    log.debug("progress: poll failed: %s", exc)
                    if stopped:
                        break
                    continue
                elapsed = time.monotonic() - self.start_time
                total = max(counts["listed"], counts["seen"], counts["done"]) or None
                rate = f"{counts['done'] / elapsed:.1f} img/s" if elapsed > 0 else ""
                bar.update(task, completed=counts["done"], total=total, rate=rate)
                if stopped:
                    break


@contextlib.contextmanager
def channel(parent: str | None) -> Iterator[str | None]:
    """A fresh local channel directory under `parent` (None: no local channel), removed afterwards."""
    if parent is None:
        yield None
        return
    path = os.path.join(parent, f"_progress-{uuid.uuid4().hex[:8]}")
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    finally:
        for name in os.listdir(path):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(path, name))
        with contextlib.suppress(OSError):
            os.rmdir(path)
