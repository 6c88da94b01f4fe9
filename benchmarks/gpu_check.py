"""GPU check: bare-model and end-to-end img/s of our ResNet50 at fp32 / bf16 / fp16.

Run through `benchmarks/gpu_check.sh`, which finds Keras and a backend first. This file needs
only numpy, Pillow, Keras 3 and one backend (JAX or PyTorch): no TensorFlow, no Beam. The model
is the pipeline's own, `pipeline.model.build_model(ModelConfig(weights="random", ...))`
(uint8 pixels in, caffe preprocessing inside, float32 (N, 2048) out), and decoding is the
pipeline's own `pipeline.imaging.decode_image` (JPEG draft mode on, as in a real run).

What it measures, in this order:
1. decode, one process: img/s of one core on the JPEG corpus (the unit for "cores needed");
2. decode pool: img/s of N decode processes, results shipped to this process (no model);
3. bare model, per precision and batch size: random uint8 batches already on the device,
   after warm-up (the first call, which compiles, is timed separately), synchronised;
4. end to end, per precision: file bytes -> decode pool -> batches -> device -> model -> host
   numpy, with one batch in flight on the device while the next is collected, so decoding
   runs beside inference as in the pipeline. The last partial batch is padded (fixed shape);
5. closeness of bf16/fp16 embeddings to fp32 on real decoded photos (the metric of tests/test_closeness.py);
6. GPU decoding (`pipeline.gpu_decode.BatchDecoder`: nvImageCodec, the resize on the device, the
   per-image CPU fallback), when nvImageCodec imports: the first pass over the corpus (compiles
   included), nvImageCodec's batch decode alone, the decode stage alone (bytes -> device batch),
   bytes -> model -> host vectors per precision, and the closeness of vectors from GPU-decoded
   pixels to vectors from CPU-decoded ones (fp32). Without a GPU it runs on nvImageCodec's CPU
   backend and says so (`--small` on a CPU machine).

The corpus is JPEG variants (crop, flip, colour jitter, rescale to 1-4 MP) of the real photos
that ship with scikit-image, made by `pipeline.sample`'s helpers; `--photos DIR` takes the
photos from a folder instead (for a machine without scikit-image's data files).

The backend is the Keras backend the model runs on: jax (jax.jit), torch (eager) or tensorflow
(tf.function, as the pipeline runs it; for CPU machines, the GPU machine has no TensorFlow).

`--small` shrinks everything (64 px, batch 8, 24 small images, 1 s timings) so that the logic
can be tested on a CPU in a minute or two; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing
import os
import pathlib
import platform
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `pipeline` importable without installing the package

from pipeline.config import DEFAULT_MAX_PIXELS, ModelConfig  # noqa: E402
from pipeline.imaging import DecodeError, decode_image  # noqa: E402

_START = time.perf_counter()


def log(msg: str) -> None:
    """Progress line with the seconds since start (the table comes last)."""
    print(f"[{time.perf_counter() - _START:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- corpus

_PHOTOS: dict[str, Any] = {}


def load_photos(photo_dir: str | None) -> dict[str, Any]:
    """name -> RGB PIL image, from `photo_dir` or from scikit-image's bundled photos."""
    from PIL import Image

    if not photo_dir:
        from pipeline import sample

        return sample.photos()
    out = {}
    for path in sorted(pathlib.Path(photo_dir).iterdir()):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            with Image.open(path) as img:
                out[path.stem] = img.convert("RGB")
    if not out:
        raise RuntimeError(f"no .png/.jpg photos in {photo_dir}")
    return out


def _init_corpus_worker(photo_dir: str | None) -> None:
    _PHOTOS.update(load_photos(photo_dir))


def _make_one(job: tuple[int, str, int, float, float]) -> str:
    from pipeline import sample

    i, folder, seed, lo, hi = job
    # One generator per image (not one for the corpus) so that the pool's order doesn't matter.
    rng = np.random.default_rng([seed, i])
    names = sorted(_PHOTOS)
    name = names[i % len(names)]
    img = sample.variant(_PHOTOS[name], rng, float(rng.uniform(lo, hi)))
    path = pathlib.Path(folder) / f"{name}_{i:05d}.jpg"
    path.write_bytes(sample.jpeg_bytes(img, quality=int(rng.integers(80, 96))))
    return str(path)


def make_corpus(
    folder: pathlib.Path, *, count: int, megapixels: tuple[float, float], photo_dir: str | None, workers: int, seed: int
) -> list[str]:
    """Write (or reuse) `count` JPEGs of about `megapixels` MP; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "corpus.json"
    params = {"count": count, "megapixels": list(megapixels), "seed": seed, "photos": photo_dir}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return sorted(str(p) for p in folder.glob("*.jpg"))
    for old in folder.glob("*.jpg"):
        old.unlink()
    jobs = [(i, str(folder), seed, *megapixels) for i in range(count)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_corpus_worker, initargs=(photo_dir,)) as pool:
        paths = sorted(pool.map(_make_one, jobs, chunksize=4))
    stamp.write_text(json.dumps(params))
    return paths


# ----------------------------------------------------------------------------- decode

_DECODE_SIZE = [224]


def _init_decode_worker(size: int) -> None:
    _DECODE_SIZE[0] = size


def decode_path(path: str) -> np.ndarray | None:
    """File -> uint8 (S, S, 3) as the pipeline decodes it (draft mode on); None for a bad file."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        pixels, _, _, _ = decode_image(data, size=_DECODE_SIZE[0], max_pixels=DEFAULT_MAX_PIXELS, draft=True)
    except DecodeError:
        return None
    return pixels


def cycle(paths: list[str], n: int) -> Iterator[str]:
    """The corpus repeated until `n` paths were given (files stay in the page cache, like a warm disk)."""
    return itertools.islice(itertools.cycle(paths), n)


def time_decode_single(paths: list[str], seconds: float, keep: int) -> tuple[float, list[np.ndarray]]:
    """img/s of one process decoding; also returns the first `keep` decoded images (the probe batch)."""
    kept: list[np.ndarray] = []
    n, t0 = 0, time.perf_counter()
    for path in itertools.cycle(paths):
        px = decode_path(path)
        n += 1
        if px is not None and len(kept) < keep:
            kept.append(px)
        if time.perf_counter() - t0 >= seconds and n >= min(len(paths), 8):
            break
    return n / (time.perf_counter() - t0), kept


def time_decode_pool(pool: Any, paths: list[str], n: int) -> float:
    """img/s of the decode pool with results shipped to this process, no model."""
    t0 = time.perf_counter()
    for _ in pool.imap(decode_path, cycle(paths, n), chunksize=4):
        pass
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- backends


class Runner:
    """One compiled inference function of fixed batch shape on one backend.

    put: numpy -> device array (async where the backend allows); infer: device -> device (async);
    get: device -> numpy float32 (blocks); sync: wait for all queued work.
    """

    name = "?"
    how = "?"

    def put(self, batch: np.ndarray) -> Any:
        raise NotImplementedError

    def infer(self, x: Any) -> Any:
        raise NotImplementedError

    def get(self, y: Any) -> np.ndarray:
        raise NotImplementedError

    def sync(self, y: Any) -> None:
        raise NotImplementedError


class JaxRunner(Runner):
    """Keras model as a pure function (`stateless_call`) under `jax.jit` (XLA)."""

    name = "jax"
    how = "jax.jit(model.stateless_call)"

    def __init__(self, model: Any) -> None:
        import jax

        self._jax = jax
        self._tv = [v.value for v in model.trainable_variables]
        self._ntv = [v.value for v in model.non_trainable_variables]

        def fn(tv: Any, ntv: Any, x: Any) -> Any:
            y, _ = model.stateless_call(tv, ntv, x, training=False)
            return y

        self._fn = jax.jit(fn)

    def put(self, batch: np.ndarray) -> Any:
        return self._jax.device_put(batch)

    def infer(self, x: Any) -> Any:
        return self._fn(self._tv, self._ntv, x)

    def get(self, y: Any) -> np.ndarray:
        return np.asarray(y, dtype=np.float32)

    def sync(self, y: Any) -> None:
        y.block_until_ready()


class TorchRunner(Runner):
    """Keras model called eagerly on the torch backend (optionally through torch.compile)."""

    name = "torch"

    def __init__(self, model: Any, *, compile_model: bool) -> None:
        import torch

        self._torch = torch
        self._cuda = torch.cuda.is_available()
        self._fn = torch.compile(model) if compile_model else model
        self.how = "torch.compile(model)" if compile_model else "eager model(x), cudnn.benchmark"

    def put(self, batch: np.ndarray) -> Any:
        t = self._torch.from_numpy(batch)
        # Pinned host memory lets the copy run beside the model instead of stalling it.
        return t.pin_memory().to("cuda", non_blocking=True) if self._cuda else t

    def infer(self, x: Any) -> Any:
        with self._torch.no_grad():
            return self._fn(x, training=False)

    def get(self, y: Any) -> np.ndarray:
        return y.detach().float().cpu().numpy()

    def sync(self, y: Any) -> None:
        if self._cuda:
            self._torch.cuda.synchronize()


class TfRunner(Runner):
    """Keras model under tf.function (what pipeline.model.CompiledModel does)."""

    name = "tensorflow"
    how = "tf.function(model)"

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        self._tf = tf
        self._fn = tf.function(lambda x: model(x, training=False))

    def put(self, batch: np.ndarray) -> Any:
        return self._tf.convert_to_tensor(batch)

    def infer(self, x: Any) -> Any:
        return self._fn(x)

    def get(self, y: Any) -> np.ndarray:
        return np.asarray(y, dtype=np.float32)

    def sync(self, y: Any) -> None:
        np.asarray(y[:1, :1])  # TensorFlow has no block_until_ready; a tiny read waits for y


def block(x: Any) -> None:
    """Wait until a backend array is computed (JAX and PyTorch run asynchronously)."""
    if hasattr(x, "block_until_ready"):
        x.block_until_ready()
    elif type(x).__module__.startswith("torch"):
        import torch

        if x.is_cuda:
            torch.cuda.synchronize()
    else:
        np.asarray(x[:1])


def backend_info(backend: str) -> dict[str, Any]:
    """Device and versions, as the backend sees them."""
    import keras

    info: dict[str, Any] = {"keras": keras.__version__, "keras_backend": keras.backend.backend()}
    if backend == "jax":
        import jax

        dev = jax.devices()[0]
        info.update(
            jax=jax.__version__,
            device=f"{dev.platform}:{getattr(dev, 'device_kind', dev)}",
            fp32_matmul_precision=str(getattr(jax.config, "jax_default_matmul_precision", None)),
        )
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        info.update(tensorflow=tf.__version__, device=f"gpu:{gpus[0].name}" if gpus else "cpu")
    else:
        import torch

        cuda = torch.cuda.is_available()
        info.update(
            torch=torch.__version__,
            device=f"cuda:{torch.cuda.get_device_name(0)}" if cuda else "cpu",
            cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
        )
    return info


# ----------------------------------------------------------------------------- timing


def time_bare(runner: Runner, batch: int, size: int, seconds: float, seed: int) -> tuple[float, float]:
    """(img/s after warm-up, seconds of the first call) on random uint8 batches already on the device."""
    rng = np.random.default_rng(seed)
    # Three different batches in rotation: real-looking traffic, never zeros.
    xs = [runner.put(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)) for _ in range(3)]
    t0 = time.perf_counter()
    y = runner.infer(xs[0])
    runner.sync(y)
    first = time.perf_counter() - t0
    for i in range(3):
        y = runner.infer(xs[i % 3])
    runner.sync(y)
    n, t0 = 0, time.perf_counter()
    while True:
        y = runner.infer(xs[n % 3])
        n += 1
        if n % 4 == 0:  # bounded queue; the clock is read only after the device caught up
            runner.sync(y)
            if time.perf_counter() - t0 >= seconds and n >= 8:
                break
    return n * batch / (time.perf_counter() - t0), first


def batches(pixels: Iterator[np.ndarray | None], batch: int) -> Iterator[tuple[np.ndarray, int]]:
    """Fixed-shape uint8 batches (the last one zero-padded) with their count of real images."""
    buf: list[np.ndarray] = []
    for px in pixels:
        if px is None:
            continue
        buf.append(px)
        if len(buf) == batch:
            yield np.stack(buf), batch
            buf = []
    if buf:
        real = len(buf)
        buf += [np.zeros_like(buf[0])] * (batch - real)
        yield np.stack(buf), real


def time_e2e(runner: Runner, pool: Any, paths: list[str], batch: int, n: int) -> tuple[float, int]:
    """(img/s, images embedded) for files -> decode pool -> model -> numpy, one batch in flight."""
    done, pending = 0, None
    t0 = time.perf_counter()
    for block, real in batches(pool.imap(decode_path, cycle(paths, n), chunksize=4), batch):
        y = runner.infer(runner.put(block))
        if pending is not None:  # fetch the previous batch while this one runs
            runner.get(pending[0])[: pending[1]]
            done += pending[1]
        pending = (y, real)
    if pending is not None:
        runner.get(pending[0])[: pending[1]]
        done += pending[1]
    return done / (time.perf_counter() - t0), done


def closeness(low: np.ndarray, ref: np.ndarray) -> dict[str, float | bool]:
    """tests/test_closeness.py's metric: each image's nearest reference vector is its own, and
    max |low - ref| / |ref - mean(ref)| is small (<= 0.05 passes)."""
    centred = np.linalg.norm(ref - ref.mean(axis=0), axis=1)
    rel = np.linalg.norm(low - ref, axis=1) / np.maximum(centred, 1e-12)
    dist = np.linalg.norm(low[:, None, :] - ref[None, :, :], axis=2)
    return {"max_rel_err": float(rel.max()), "nearest_is_own": bool((dist.argmin(axis=1) == np.arange(len(ref))).all())}


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("jax", "torch", "tensorflow"), default=os.environ.get("KERAS_BACKEND", "jax"))
    p.add_argument("--precisions", default="fp32,bf16,fp16")
    p.add_argument("--batch", type=int, default=256, help="batch of the end-to-end run (and first bare row)")
    p.add_argument("--extra-batches", default="", help="more bare-only batch sizes, measured if time is left")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=500, help="JPEGs in the corpus")
    p.add_argument("--megapixels", default="1,4")
    p.add_argument("--workers", type=int, default=0, help="decode processes (0: CPUs - 1)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each timed run")
    p.add_argument("--budget", type=float, default=240.0, help="seconds; rows that would pass it are skipped")
    p.add_argument("--corpus", default="/tmp/embedpipe-gpu-corpus")
    p.add_argument("--photos", default=None, help="folder of source photos (default: scikit-image's)")
    p.add_argument("--torch-compile", action="store_true", help="torch backend: wrap the model in torch.compile")
    p.add_argument("--gpu-decode", choices=("auto", "on", "off"), default="auto", help="auto: if nvImageCodec imports")
    p.add_argument("--decode-device", choices=("auto", "gpu", "cpu"), default="auto", help="nvImageCodec backend")
    p.add_argument("--probe", type=int, default=128, help="photos in the GPU-vs-CPU decode closeness check")
    p.add_argument("--json", default=None, help="write all figures here")
    p.add_argument("--small", action="store_true", help="tiny sizes for a CPU test of the logic")
    args = p.parse_args(argv)
    if args.small:
        args.image_size, args.batch, args.extra_batches = 64, 8, "4"
        args.images, args.megapixels, args.seconds, args.probe = 24, "0.2,0.4", 1.0, 16
    return args


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every measurement that fits the budget, print the table, return the figures."""
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend  # before keras is imported (it is imported late)
    precisions = [p for p in args.precisions.split(",") if p]
    extra = [int(b) for b in args.extra_batches.split(",") if b]
    lo, hi = (float(v) for v in args.megapixels.split(","))
    ncpu = cpu_count()
    workers = args.workers or max(1, ncpu - 1)
    import PIL

    result: dict[str, Any] = {
        "host": {"cpus": ncpu, "python": platform.python_version(), "numpy": np.__version__, "pillow": PIL.__version__},
        "settings": {
            "backend": args.backend,
            "image_size": args.image_size,
            "batch": args.batch,
            "images": args.images,
            "megapixels": [lo, hi],
            "decode_workers": workers,
            "seconds": args.seconds,
        },
        "rows": [],
        "skipped": [],
    }

    paths = make_corpus(
        pathlib.Path(args.corpus),
        count=args.images,
        megapixels=(lo, hi),
        photo_dir=args.photos,
        workers=ncpu,
        seed=0,
    )
    corpus_mb = sum(os.path.getsize(p) for p in paths) / 1e6
    log(f"corpus: {len(paths)} JPEGs of {lo}-{hi} MP, {corpus_mb:.0f} MB in {args.corpus}")
    result["settings"]["corpus_mb"] = round(corpus_mb, 1)

    _init_decode_worker(args.image_size)
    single, probe = time_decode_single(paths, min(args.seconds, 4.0), keep=args.batch)
    log(f"decode, 1 process: {single:.0f} img/s")
    # Fork before any backend (and its threads or CUDA context) exists in this process.
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(workers, initializer=_init_decode_worker, initargs=(args.image_size,))
    try:
        pool.map(decode_path, paths[:workers])  # start-up out of the timing
        n_pool = max(len(paths), int(single * workers * args.seconds))
        pooled = time_decode_pool(pool, paths, n_pool)
        log(f"decode, pool of {workers}: {pooled:.0f} img/s ({pooled / workers:.0f} per process)")
        result["decode"] = {"single_img_s": single, "pool_img_s": pooled, "pool_workers": workers}
        runners = _measure_models(args, precisions, extra, pool, paths, probe, result)
        if args.gpu_decode != "off":
            _gpu_decode_section(args, paths, runners, result)
    finally:
        pool.terminate()
    print_table(result)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _build_runner(args: argparse.Namespace, precision: str) -> Runner:
    from pipeline.model import build_model

    model = build_model(ModelConfig(weights="random", image_size=args.image_size, precision=precision))
    if args.backend == "jax":
        return JaxRunner(model)
    if args.backend == "tensorflow":
        return TfRunner(model)
    return TorchRunner(model, compile_model=args.torch_compile)


def _measure_models(
    args: argparse.Namespace,
    precisions: list[str],
    extra: list[int],
    pool: Any,
    paths: list[str],
    probe: list[np.ndarray],
    result: dict[str, Any],
) -> dict[str, Runner]:
    if args.backend == "torch":
        import torch

        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
    result["backend"] = backend_info(args.backend)
    log(f"backend: {result['backend']}")

    def remaining() -> float:
        return args.budget - (time.perf_counter() - _START)

    probe_batch = np.stack(probe + [np.zeros_like(probe[0])] * (args.batch - len(probe)))
    runners: dict[str, Runner] = {}
    reference = None
    for precision in precisions:
        # A row costs a build, a compile and two timed runs; skip it rather than overrun the budget.
        if remaining() < 3 * args.seconds + 20:
            result["skipped"].append(f"{precision} b{args.batch}: out of time")
            continue
        try:
            t0 = time.perf_counter()
            runner = runners[precision] = _build_runner(args, precision)
            build_s = time.perf_counter() - t0
            bare, first = time_bare(runner, args.batch, args.image_size, args.seconds, seed=1)
            log(f"{precision} b{args.batch}: bare {bare:.0f} img/s (build {build_s:.1f}s, first call {first:.1f}s)")
            emb = runner.get(runner.infer(runner.put(probe_batch)))[: len(probe)]
            n_e2e = max(2 * args.batch, int(min(bare, result["decode"]["pool_img_s"]) * args.seconds))
            n_e2e = -(-n_e2e // args.batch) * args.batch
            e2e, done = time_e2e(runner, pool, paths, args.batch, n_e2e)
            log(f"{precision} b{args.batch}: end to end {e2e:.0f} img/s over {done} images")
        except Exception as exc:  # one backend/precision failing must not lose the other rows
            log(f"{precision} b{args.batch}: FAILED {type(exc).__name__}: {exc}")
            result["skipped"].append(f"{precision} b{args.batch}: {type(exc).__name__}: {exc}")
            continue
        row: dict[str, Any] = {
            "precision": precision,
            "batch": args.batch,
            "bare_img_s": bare,
            "e2e_img_s": e2e,
            "first_call_s": first,
            "how": runner.how,
        }
        if precision == "fp32":
            reference = emb
        elif reference is not None:
            row["vs_fp32"] = closeness(emb, reference)
        result["rows"].append(row)
    for b in extra:
        for precision, runner in runners.items():
            if remaining() < args.seconds + 30:
                result["skipped"].append(f"{precision} b{b} bare: out of time")
                continue
            try:
                bare, first = time_bare(runner, b, args.image_size, args.seconds, seed=2)
            except Exception as exc:
                result["skipped"].append(f"{precision} b{b} bare: {type(exc).__name__}: {exc}")
                continue
            log(f"{precision} b{b}: bare {bare:.0f} img/s (first call {first:.1f}s)")
            result["rows"].append(
                {"precision": precision, "batch": b, "bare_img_s": bare, "first_call_s": first, "how": runner.how}
            )
    return runners


# ----------------------------------------------------------------------------- GPU decoding


def _left(args: argparse.Namespace) -> float:
    return args.budget - (time.perf_counter() - _START)


def _chunks(items: list, size: int, n: int) -> Iterator[list]:
    """`n` items of `items` (cycled) in lists of `size`."""
    it = cycle(items, n)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _gpu_decode_section(args: argparse.Namespace, paths: list[str], runners: dict[str, Runner], result: dict) -> None:
    """Item 6 of the module docstring. A failure is recorded in the table, never raised."""
    section: dict[str, Any] = {"rows": []}
    result["gpu_decode"] = section
    try:
        from pipeline import gpu_decode
        from pipeline.records import SourceImage

        available, why = gpu_decode.gpu_decode_status()
    except Exception as exc:
        section["error"] = f"{type(exc).__name__}: {exc}"
        return
    if args.gpu_decode == "auto" and why.startswith("nvImageCodec is not installed"):
        section["error"] = why
        return
    device = args.decode_device if args.decode_device != "auto" else ("gpu" if available else "cpu")
    section.update(device=device, status=why)
    log(f"GPU decode: device={device} ({why})")
    from concurrent.futures import ThreadPoolExecutor

    sources = [SourceImage(pathlib.Path(p).name, p, pathlib.Path(p).read_bytes()) for p in paths]
    threads = ThreadPoolExecutor(cpu_count())
    decoder = None
    try:
        decoder = gpu_decode.BatchDecoder(
            size=args.image_size, max_pixels=DEFAULT_MAX_PIXELS, device=device, pool=threads
        )
        _gpu_decode_rows(args, gpu_decode, decoder, sources, runners, section)
    except Exception as exc:  # the CPU-decode rows above still stand
        section["error"] = f"{type(exc).__name__}: {exc}"
        log(f"GPU decode: FAILED {section['error']}")
    finally:
        threads.shutdown()
        if decoder is not None:
            r = decoder.resizer
            section.update(resize_programs=r.programs(), resize_shapes=len(r.shapes), padded_sizes=len(r.padded))
            section["last_error"] = decoder.last_error


def _gpu_decode_rows(args, gpu_decode, decoder, sources: list, runners: dict[str, Runner], section: dict) -> None:
    from pipeline import device_tensors

    b, seconds, device = args.batch, args.seconds, decoder.device

    def stage(batch: list) -> tuple[Any, int, collections.Counter]:
        """bytes -> one device batch of b images (zero-padded): the decode stage as the pipeline runs it."""
        rows, counts = decoder.decode_counted(batch)
        pixels = [r.pixels for r in rows if not isinstance(r, dict)]
        return device_tensors.stack(pixels, b), len(pixels), counts

    counts: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    for batch in _chunks(sources, b, len(sources)):
        x, _, c = stage(batch)
        block(x)
        counts.update(c)
    first = time.perf_counter() - t0
    section["first_pass"] = {"images": len(sources), "seconds": first, "counts": dict(counts)}
    log(f"GPU decode: first pass over {len(sources)} images {first:.1f}s (compiles included), {dict(counts)}")

    nv = gpu_decode._nvimgcodec()
    datas = [s.data for s in sources]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < len(datas):
        for batch in _chunks(datas, b, len(datas)):
            decoder._decoder.decode([nv.CodeStream(d) for d in batch], params=decoder._params)
            n += len(batch)
        device_tensors.device_synchronize()
    section["nvimgcodec_img_s"] = n / (time.perf_counter() - t0)
    section["nvimgcodec_synchronized"] = device_tensors._cudart() is not None or device == "cpu"
    log(f"GPU decode: nvImageCodec batch decode alone {section['nvimgcodec_img_s']:.0f} img/s")

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < len(sources):
        for batch in _chunks(sources, b, len(sources)):
            x, real, _ = stage(batch)
            n += real
        block(x)
    section["stage_img_s"] = stage_rate = n / (time.perf_counter() - t0)
    log(f"GPU decode: decode stage alone {stage_rate:.0f} img/s")

    for precision, runner in runners.items():
        if _left(args) < seconds + 20:
            section["rows"].append({"precision": precision, "skipped": "out of time"})
            continue
        n_e2e = -(-max(2 * b, int(stage_rate * seconds)) // b) * b
        done, pending, t0 = 0, None, time.perf_counter()
        for batch in _chunks(sources, b, n_e2e):
            x, real, _ = stage(batch)
            y = runner.infer(x)  # asynchronous on JAX/PyTorch: the next batch decodes meanwhile
            if pending is not None:
                runner.get(pending[0])
                done += pending[1]
            pending = (y, real)
        runner.get(pending[0])
        done += pending[1]
        rate = done / (time.perf_counter() - t0)
        section["rows"].append({"precision": precision, "batch": b, "e2e_img_s": rate, "images": done})
        log(f"GPU decode: {precision} b{b} bytes -> vectors {rate:.0f} img/s over {done} images")

    reference = runners.get("fp32") or next(iter(runners.values()), None)
    if reference is None:
        return
    probe = sources[: args.probe]
    gpu_px = [r.pixels for r in decoder.decode(probe) if not isinstance(r, dict)]
    cpu_px = [decode_image(s.data, size=args.image_size, max_pixels=DEFAULT_MAX_PIXELS, draft=True)[0] for s in probe]

    def embed(pixels: list) -> np.ndarray:
        out = []
        for i in range(0, len(pixels), b):
            part = pixels[i : i + b]
            x = device_tensors.stack(part, b)
            out.append(reference.get(reference.infer(x if not isinstance(x, np.ndarray) else reference.put(x))))
            out[-1] = out[-1][: len(part)]
        return np.concatenate(out)

    if len(gpu_px) == len(cpu_px):
        section["closeness_vs_cpu"] = {"images": len(probe), **closeness(embed(gpu_px), embed(cpu_px))}
        log(f"GPU decode: vectors vs CPU-decoded, fp32: {section['closeness_vs_cpu']}")


def print_gpu_decode(section: dict | None) -> None:
    """The GPU decode lines of the table."""
    if not section:
        return
    print()
    print(f"GPU decode (pipeline.gpu_decode.BatchDecoder), nvImageCodec on {section.get('device', '?')}: ", end="")
    print(section.get("status", ""))
    if "first_pass" in section:
        fp = section["first_pass"]
        print(
            f"first pass over {fp['images']} images: {fp['seconds']:.1f}s, compiles included "
            f"({section.get('resize_programs', '?')} resize programs compiled for "
            f"{section.get('resize_shapes', '?')} distinct input shapes; "
            f"{section.get('padded_sizes', '?')} raw sizes padded by a device op);"
            f" decoded where: {fp['counts']}"
        )
    if "nvimgcodec_img_s" in section:
        note = "" if section.get("nvimgcodec_synchronized") else " (no libcudart found: not synchronised, optimistic)"
        print(f"nvImageCodec batch decode alone: {section['nvimgcodec_img_s']:.0f} img/s{note}")
    if "stage_img_s" in section:
        print(f"decode stage alone (bytes -> device batch): {section['stage_img_s']:.0f} img/s")
    for row in section.get("rows", []):
        if "skipped" in row:
            print(f"{row['precision']:<9} skipped: {row['skipped']}")
        else:
            print(
                f"{row['precision']:<9} b{row['batch']}: bytes -> GPU decode -> model -> vectors "
                f"{row['e2e_img_s']:.0f} img/s"
            )
    if "closeness_vs_cpu" in section:
        c = section["closeness_vs_cpu"]
        print(
            f"vectors from GPU-decoded vs CPU-decoded pixels (fp32, {c['images']} photos): "
            f"max rel err {c['max_rel_err']:.4f}, nearest own {c['nearest_is_own']}"
        )
    for key in ("error", "last_error"):
        if section.get(key):
            print(f"{key}: {section[key]}")


def print_table(result: dict[str, Any]) -> None:
    """The summary: what ran where, then one line per precision and batch size."""
    host, dec, be = result["host"], result.get("decode", {}), result.get("backend", {})
    st = result["settings"]
    print()
    print(f"device: {be.get('device', '?')}  backend: keras {be.get('keras', '?')} on {st['backend']} ", end="")
    print(
        f"{be.get('jax', be.get('torch', be.get('tensorflow', '?')))}  python {host['python']}  numpy {host['numpy']}",
        end="",
    )
    print(f"  pillow {host['pillow']}  CPUs: {host['cpus']}")
    extra = {k: v for k, v in be.items() if k in ("fp32_matmul_precision", "cudnn_allow_tf32")}
    if extra:
        print(f"fp32 settings: {extra}")
    print(
        f"corpus: {st['images']} JPEGs, {st['megapixels'][0]}-{st['megapixels'][1]} MP ({st.get('corpus_mb', '?')} MB),"
        f" {st['image_size']}x{st['image_size']}, draft decode"
    )
    if dec:
        print(
            f"decode: 1 process {dec['single_img_s']:.0f} img/s; pool of {dec['pool_workers']}: "
            f"{dec['pool_img_s']:.0f} img/s"
        )
    print()
    head = f"{'precision':<9} {'batch':>5} {'bare img/s':>10} {'e2e img/s':>9} {'e2e/bare':>8} {'cores':>5}  note"
    print(head)
    print("-" * len(head))
    single = dec.get("single_img_s") or float("nan")
    for r in result["rows"]:
        e2e = r.get("e2e_img_s")
        cells = [
            f"{r['precision']:<9}",
            f"{r['batch']:>5}",
            f"{r['bare_img_s']:>10.0f}",
            f"{e2e:>9.0f}" if e2e else f"{'-':>9}",
            f"{e2e / r['bare_img_s']:>8.2f}" if e2e else f"{'-':>8}",
            f"{r['bare_img_s'] / single:>5.0f}",
        ]
        note = f"first call {r['first_call_s']:.1f}s"
        if "vs_fp32" in r:
            c = r["vs_fp32"]
            note += f"; vs fp32: max rel err {c['max_rel_err']:.4f}, nearest own {c['nearest_is_own']}"
        print(" ".join(cells) + "  " + note)
    print("cores = decode processes needed to feed the bare model (bare img/s / 1-process decode img/s)")
    how = {r["how"] for r in result["rows"]}
    if how:
        print(f"model called as: {', '.join(sorted(how))}")
    for s in result["skipped"]:
        print(f"skipped: {s}")
    print_gpu_decode(result.get("gpu_decode"))


if __name__ == "__main__":
    main()
