"""EmbedImages: DecodedImage -> embedding rows, batched on a model loaded once per process.

The model lives in a process-wide `shared.Shared` cache: every DoFn instance in
a worker process (Beam makes several: one per bundle processor, per stage)
gets the same model, built on first use. Batches always have the compiled
shape (partial batches are padded), and inference of one batch runs on a
background thread while the bundle thread keeps reading and decoding the next,
so the model does not wait on Pillow.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import os
import time
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from pipeline import reasons, records
from pipeline.bundles import in_global_window
from pipeline.config import ModelConfig
from pipeline.records import DecodedImage

log = logging.getLogger(__name__)

_MODELS = shared.Shared()


def stack_pixels(pixels: list):
    """One batch from per-image pixels: numpy stays numpy (np.stack, as always); device tensors
    from the GPU decoder are stacked on their device, so they never cross to the host."""
    if all(isinstance(p, np.ndarray) for p in pixels):
        return np.stack(pixels)
    from pipeline.device_tensors import stack

    return stack(pixels)


class _ModelHolder:
    """Weak-referenceable box for the compiled model (what `shared.Shared` caches)."""

    def __init__(self, model) -> None:
        self.model = model
        self.load_reported = False


def load_model(cfg: ModelConfig, batch_size: int, *, intra_op_threads: int = 0, require_gpu: bool = False):
    """The compiled model for this process, built on first use and cached."""
    from pipeline.model import CompiledModel, configure_tensorflow
    from pipeline.quiet import import_tensorflow

    def build():
        start = time.perf_counter()
        import_tensorflow()  # before anything else imports it: its start-up noise stays off the log
        configure_tensorflow(intra_op_threads=intra_op_threads, require_gpu=require_gpu)
        holder = _ModelHolder(CompiledModel(cfg, batch_size))
        log.info(
            "embedpipe: model %s (batch %d) built in %.1fs in process %d",
            cfg.fingerprint(),
            batch_size,
            time.perf_counter() - start,
            os.getpid(),
        )
        return holder

    tag = f"{cfg.fingerprint()}|{batch_size}|{intra_op_threads}"
    return _MODELS.acquire(build, tag=tag)


class _EmbedFn(beam.DoFn):
    """The embed stage's DoFn: batches of the compiled shape, inference of one batch overlapping the next."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        batch_size: int,
        embedded_at: datetime.datetime,
        intra_op_threads: int = 0,
        require_gpu: bool = False,
        prefetch: bool = True,
    ) -> None:
        self._cfg = cfg
        self._batch_size = batch_size
        self._embedded_at = embedded_at
        self._threads = intra_op_threads
        self._require_gpu = require_gpu
        self._prefetch = prefetch
        self._embedded = Metrics.counter("embedpipe", "images_embedded")
        self._failed = Metrics.counter("embedpipe", "images_failed_embed")
        self._batch_ms = Metrics.distribution("embedpipe", "batch_inference_ms")

    def setup(self) -> None:
        # The model is built on the first image, not here: a run with nothing to
        # embed (a quiet night) then never imports TensorFlow. --require-gpu is
        # the exception: a worker without a GPU must fail at start-up.
        self._holder = None
        if self._require_gpu:
            from pipeline.model import configure_tensorflow

            configure_tensorflow(intra_op_threads=self._threads, require_gpu=True)
        self._fingerprint = self._cfg.fingerprint()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedpipe-infer")

    def _model(self):
        if self._holder is None:
            self._holder = load_model(
                self._cfg, self._batch_size, intra_op_threads=self._threads, require_gpu=self._require_gpu
            )
        if not self._holder.load_reported:
            # Metrics only count inside a bundle: the first bundle to use a model
            # reports its build (once per process).
            self._holder.load_reported = True
            Metrics.counter("embedpipe", "model_loads").inc()
        return self._holder.model

    def start_bundle(self) -> None:
        self._buffer: list[DecodedImage] = []
        self._pending: concurrent.futures.Future | None = None

    def _infer(self, model, batch: list[DecodedImage]) -> tuple[list, int]:
        """Runs on the inference thread: (output rows, milliseconds). No metrics here:
        Beam's metric cells are thread-local to the bundle thread."""
        start = time.perf_counter()
        try:
            vectors = model(stack_pixels([im.pixels for im in batch]))
        except Exception as exc:  # one bad batch becomes error rows, not a failed job
            log.exception("inference failed on a batch of %d", len(batch))
            message = f"{type(exc).__name__}: {exc}"
            rows = [
                beam.pvalue.TaggedOutput(
                    "errors",
                    records.error_row(im.id, im.uri, "embed", reasons.EMBED_ERROR, message, im.content_sha256),
                )
                for im in batch
            ]
            return rows, -1
        rows = [
            records.embedding_row(im, vec, self._fingerprint, self._embedded_at)
            for im, vec in zip(batch, vectors, strict=True)
        ]
        return rows, int((time.perf_counter() - start) * 1000)

    def _account(self, result: tuple[list, int]) -> list:
        """On the bundle thread: update metrics for a finished batch."""
        rows, ms = result
        if ms < 0:
            self._failed.inc(len(rows))
        else:
            self._batch_ms.update(ms)
            self._embedded.inc(len(rows))
        return rows

    def _collect(self) -> list:
        if self._pending is None:
            return []
        result, self._pending = self._pending.result(), None
        return self._account(result)

    def _submit(self) -> list:
        """Start inference on the buffer; return the outputs of the batch before it."""
        batch, self._buffer = self._buffer, []
        model = self._model()  # built here, on the bundle thread, on first use
        if not self._prefetch:
            return self._account(self._infer(model, batch))
        done = self._collect()
        self._pending = self._executor.submit(self._infer, model, batch)
        return done

    def process(self, image: DecodedImage):
        self._buffer.append(image)
        if len(self._buffer) >= self._batch_size:
            yield from self._submit()

    def finish_bundle(self):
        out = self._submit() if self._buffer else []
        out += self._collect()
        for row in out:
            yield in_global_window(row)

    def teardown(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)


class EmbedImages(beam.PTransform):
    """DecodedImage -> embedding rows (main) and error rows ("errors").

    Expects the global window (batch pipelines): rows of the last partial batch
    are emitted from finish_bundle.

    Args:
        cfg: the model; resolved here, in the driver, if it is not yet (`ModelConfig.resolve`), so that
            the workers stamp its fingerprint on every row without reading a weights file to name it.
        options: by keyword, those of the DoFn: batch_size and embedded_at (required),
            intra_op_threads, require_gpu, prefetch.
    """

    def __init__(self, cfg: ModelConfig, **options: Any) -> None:
        super().__init__()
        self._fn = _EmbedFn(cfg.resolve(), **options)

    def expand(self, images):
        return images | "Embed" >> beam.ParDo(self._fn).with_outputs("errors", main="embeddings")
