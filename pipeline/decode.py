"""DecodeImages: SourceImage -> DecodedImage, or an error row with a reason (rules in imaging.py).

Decoding runs on a process-wide pool of threads (Pillow and hashlib release the
GIL while they work), a bounded number of images ahead of the bundle thread, so
that inference (which runs downstream in the same fused stage) never waits for
one image at a time to be decoded. Outputs keep the input order.

The pool's threads run at a lower scheduling priority than the rest of the
process: on a CPU-only worker the model's threads keep the cores and decoding
fills the gaps between and within batches; on a GPU worker, where the cores are
otherwise idle, the priority changes nothing.

With decode="gpu", images are gathered into batches and decoded by
`gpu_decode.BatchDecoder` (nvImageCodec on the GPU; its CPU backend where no GPU
is visible) on one thread per process, one batch ahead of the bundle thread; the
pool then does the host work (hashing, headers) and the per-image CPU fallbacks.
Pixels stay on the device and reach EmbedImages (fused into the same stage) as
tensors of the Keras backend.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.bundles import in_global_window
from pipeline.errors import UsageError
from pipeline.gpu_decode import decode_one  # Beam-free home: the GPU check machine has no Beam
from pipeline.records import DecodedImage, SourceImage

__all__ = ["DecodeImages", "decode_one", "decode_pool", "default_decode_threads"]

log = logging.getLogger(__name__)

# Niceness added to decode threads (Linux: per thread). 10 gives them ~1/10 of a
# core's share against a busy model thread, yet all of an idle core.
DECODE_NICENESS = 10

_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
# One BatchDecoder (and the one thread that drives it) per configuration and process.
_BATCH_DECODERS: dict[tuple, tuple] = {}
_BATCH_LOCK = threading.Lock()  # held while one is built (seconds: imports Keras), so only one is
# A forked child inherits the pool objects but not their threads: it must make its own.
os.register_at_fork(after_in_child=_POOLS.clear)
os.register_at_fork(after_in_child=_BATCH_DECODERS.clear)
DECODE_MODES = ("auto", "cpu", "gpu")


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
        self._slots = decode_slots(threads, self._ahead)

    def start_bundle(self) -> None:
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()

    def _emit(self, future: concurrent.futures.Future):
        result = future.result()
        if isinstance(result, DecodedImage):
            return result
        self._failed.inc()
        return beam.pvalue.TaggedOutput("errors", result)

    def process(self, image: SourceImage):
        # The slots are the process's: with several bundles at once, source bytes waiting in the pool
        # stay bounded by one look-ahead, not one per bundle. A slot frees when its decode ends.
        self._slots.acquire()
        future = self._pool.submit(decode_one, image, self._kwargs)
        future.add_done_callback(lambda _: self._slots.release())
        self._pending.append(future)
        while len(self._pending) > self._ahead:
            yield self._emit(self._pending.popleft())

    def finish_bundle(self):
        while self._pending:
            yield in_global_window(self._emit(self._pending.popleft()))


_SLOTS: dict[int, threading.BoundedSemaphore] = {}
os.register_at_fork(after_in_child=_SLOTS.clear)


def decode_slots(threads: int, count: int) -> threading.BoundedSemaphore:
    """The process-wide limit on images submitted to the decode pool of `threads` and not yet decoded."""
    with _POOLS_LOCK:
        return _SLOTS.setdefault(threads, threading.BoundedSemaphore(count))


def batch_decoder(kwargs: dict, threads: int, device: str):
    """The process-wide (BatchDecoder, its single-thread executor) for these options.

    nvImageCodec's decoder holds CUDA streams and buffers: one per process, driven by one
    thread, whichever DoFn instance (Beam makes several) submits the batch.
    """
    from pipeline.gpu_decode import BatchDecoder

    key = (tuple(sorted(kwargs.items())), threads, device)
    with _BATCH_LOCK:
        found = _BATCH_DECODERS.get(key)
        if found is None:
            # Raises (one line: what to install) where nvImageCodec does not import.
            decoder = BatchDecoder(**kwargs, device=device, pool=decode_pool(threads))
            executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedpipe-gpu-decode")
            found = _BATCH_DECODERS[key] = (decoder, executor)
        return found


def gpu_decoding(decode: str, *, cpu_backend_ok: bool = False) -> tuple[str | None, str]:
    """(nvImageCodec device to decode on, or None for the Pillow path; why) for a --decode mode, on this worker.

    auto: the GPU when nvImageCodec imports and decodes on a visible CUDA device, else Pillow.
    gpu: the GPU, or an error saying what is missing; with `cpu_backend_ok`, nvImageCodec's CPU
    backend instead (the tests' way to run the GPU path's code on a machine without one).
    """
    if decode == "cpu":
        return None, "--decode cpu"
    if decode == "auto" and not os.path.exists("/dev/nvidiactl"):
        # No NVIDIA driver node: no GPU to ask for, and loading nvImageCodec would only fill the log.
        return None, "--decode auto: no NVIDIA GPU on this worker; decoding with Pillow on the CPU"
    from pipeline.gpu_decode import gpu_decode_status

    available, why = gpu_decode_status()
    if available:
        return "gpu", why
    if decode == "auto":
        return None, f"--decode auto: {why}; decoding with Pillow on the CPU"
    if cpu_backend_ok:
        return "cpu", f"{why}; nvImageCodec's CPU backend decodes"
    raise GpuDecodeUnavailableError(f"--decode gpu: {why} (use --decode auto or cpu on machines without a GPU)")


class GpuDecodeUnavailableError(UsageError):
    """--decode gpu on a worker where nvImageCodec cannot decode on a GPU."""


class _GpuDecodeFn(beam.DoFn):
    def __init__(
        self, *, size: int, resize: str, max_pixels: int, draft: bool, thumbnails: bool, threads: int, batch_size: int
    ):
        self._kwargs = dict(size=size, resize=resize, max_pixels=max_pixels, draft=draft, thumbnails=thumbnails)
        self._threads = threads
        self._batch_size = batch_size
        self._failed = Metrics.counter("embedpipe", "images_failed_decode")
        self._on_gpu = Metrics.counter("embedpipe", "images_decoded_gpu")
        self._fallback = Metrics.counter("embedpipe", "images_decoded_cpu_fallback")
        self.device = "gpu"

    def setup(self) -> None:
        threads = self._threads or default_decode_threads()
        self._decoder, self._executor = batch_decoder(self._kwargs, threads, self.device)

    def start_bundle(self) -> None:
        self._buffer: list[SourceImage] = []
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()

    def _submit(self) -> None:
        batch, self._buffer = self._buffer, []
        self._pending.append(self._executor.submit(self._decoder.decode_counted, batch))

    def _emit(self, future: concurrent.futures.Future):
        # Metrics are counted here, on the bundle thread (Beam's metric cells are per thread).
        results, counts = future.result()
        self._on_gpu.inc(counts.get("gpu", 0))
        self._fallback.inc(sum(v for k, v in counts.items() if k.startswith("cpu:")))
        for result in results:
            if isinstance(result, DecodedImage):
                yield result
            else:
                self._failed.inc()
                yield beam.pvalue.TaggedOutput("errors", result)

    def process(self, image: SourceImage):
        self._buffer.append(image)
        if len(self._buffer) >= self._batch_size:
            self._submit()
            # One batch decodes while the previous one goes downstream to the model.
            while len(self._pending) > 1:
                yield from self._emit(self._pending.popleft())

    def finish_bundle(self):
        if self._buffer:
            self._submit()
        while self._pending:
            for item in self._emit(self._pending.popleft()):
                yield in_global_window(item)


class _ChosenDecodeFn(beam.DoFn):
    """--decode auto|gpu: the path is chosen on the worker at setup, where the GPU is (or is not)."""

    def __init__(self, cpu: _DecodeFn, gpu: _GpuDecodeFn, decode: str, cpu_backend_ok: bool) -> None:
        self._cpu, self._gpu = cpu, gpu
        self._decode, self._cpu_backend_ok = decode, cpu_backend_ok

    def setup(self) -> None:
        device, why = gpu_decoding(self._decode, cpu_backend_ok=self._cpu_backend_ok)  # raises for gpu without one
        if device is None:
            self._impl = self._cpu
        else:
            self._gpu.device = device
            self._impl = self._gpu
        log.info("embedpipe: decoding: %s", why)
        self._impl.setup()

    def start_bundle(self) -> None:
        self._impl.start_bundle()

    def process(self, image: SourceImage):
        return self._impl.process(image)

    def finish_bundle(self):
        return self._impl.finish_bundle()


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
        decode: str = "cpu",
        batch_size: int = 64,
        cpu_backend_ok: bool = False,
    ) -> None:
        """threads: decode threads per worker process (0: one per CPU core).

        decode: "cpu" (Pillow on the thread pool), "gpu" (nvImageCodec, `batch_size` images
        at a time; see gpu_decode.py; a worker without a usable GPU fails at setup, unless
        `cpu_backend_ok` lets nvImageCodec's CPU backend stand in) or "auto" (the GPU where the
        worker has one, else Pillow). All give the same rows, reasons and counts.
        """
        super().__init__()
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}; got {decode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        common = dict(size=size, resize=resize, max_pixels=max_pixels, draft=draft, thumbnails=thumbnails)
        cpu = _DecodeFn(**common, threads=threads)
        if decode == "cpu":
            self._fn = cpu
        else:
            gpu = _GpuDecodeFn(**common, threads=threads, batch_size=batch_size)
            self._fn = _ChosenDecodeFn(cpu, gpu, decode, cpu_backend_ok)

    def expand(self, images):
        return images | "Decode" >> beam.ParDo(self._fn).with_outputs("errors", main="decoded")
