"""DecodeImages: SourceImage -> DecodedImage, or an error row with a reason (rules in imaging.py).

Decoding runs on a process-wide pool of threads (Pillow and hashlib release the
GIL while they work), a bounded number of images ahead of the bundle thread, so
that inference (which runs downstream in the same fused stage) never waits for
one image at a time to be decoded. Outputs keep the input order.

The pool's threads run at a lower scheduling priority than the rest of the
process: on a CPU-only worker the model's threads keep the cores and decoding
fills the gaps between and within batches; on a GPU worker, where the cores are
otherwise idle, the priority changes nothing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import os
import threading

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline import records
from pipeline.bundles import in_global_window
from pipeline.imaging import DecodeError, decode_image
from pipeline.records import DecodedImage, SourceImage

log = logging.getLogger(__name__)

# Niceness added to decode threads (Linux: per thread). 10 gives them ~1/10 of a
# core's share against a busy model thread, yet all of an idle core.
DECODE_NICENESS = 10

_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
# A forked child inherits the pool objects but not their threads: it must make its own.
os.register_at_fork(after_in_child=_POOLS.clear)


def default_decode_threads() -> int:
    """One decode thread per CPU core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _lower_priority() -> None:
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + DECODE_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: run at normal priority
        log.debug("decode thread keeps its priority: %s", exc)


def decode_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide decode pool with `threads` threads (created on first use).

    Shared by every DoFn instance of the process (Beam makes one per bundle
    processor), so a worker never runs more decode threads than asked for.
    """
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(
                threads, thread_name_prefix="embedpipe-decode", initializer=_lower_priority
            )
            _POOLS[threads] = pool
        return pool


def decode_one(image: SourceImage, kwargs: dict) -> DecodedImage | dict:
    """Decode one source image: a DecodedImage, or an error row (never raises for bad input)."""
    sha = hashlib.sha256(image.data).hexdigest()
    try:
        pixels, width, height, thumb = decode_image(image.data, **kwargs)
    except DecodeError as exc:
        return records.error_row(image.id, image.uri, "decode", exc.reason, str(exc), sha)
    return DecodedImage(image.id, image.uri, pixels, sha, width, height, image.meta, thumb, marker=image.marker)


class _DecodeFn(beam.DoFn):
    def __init__(self, *, size: int, resize: str, max_pixels: int, draft: bool, thumbnails: bool, threads: int):
        self._kwargs = dict(size=size, resize=resize, max_pixels=max_pixels, draft=draft, thumbnail=thumbnails)
        self._threads = threads
        self._failed = Metrics.counter("embedpipe", "images_failed_decode")

    def setup(self) -> None:
        threads = self._threads or default_decode_threads()
        self._pool = decode_pool(threads)
        # Enough in flight to keep every decode thread busy while the bundle
        # thread waits on one result; small enough that only a few source files
        # (each at most --max-bytes) are held at once.
        self._ahead = max(8, 4 * threads)

    def start_bundle(self) -> None:
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()

    def _emit(self, future: concurrent.futures.Future):
        result = future.result()
        if isinstance(result, DecodedImage):
            return result
        self._failed.inc()
        return beam.pvalue.TaggedOutput("errors", result)

    def process(self, image: SourceImage):
        self._pending.append(self._pool.submit(decode_one, image, self._kwargs))
        while len(self._pending) > self._ahead:
            yield self._emit(self._pending.popleft())

    def finish_bundle(self):
        while self._pending:
            yield in_global_window(self._emit(self._pending.popleft()))


class DecodeImages(beam.PTransform):
    """SourceImage -> DecodedImage (main output) and error rows (output "errors").

    Expects the global window (batch pipelines): the last images of a bundle are
    emitted from finish_bundle.
    """

    def __init__(
        self,
        *,
        size: int,
        resize: str = "squash",
        max_pixels: int,
        draft: bool = True,
        thumbnails: bool = False,
        threads: int = 0,
    ) -> None:
        """threads: decode threads per worker process (0: one per CPU core)."""
        super().__init__()
        self._fn = _DecodeFn(
            size=size, resize=resize, max_pixels=max_pixels, draft=draft, thumbnails=thumbnails, threads=threads
        )

    def expand(self, images):
        return images | "Decode" >> beam.ParDo(self._fn).with_outputs("errors", main="decoded")
