"""Throughput of embedpipe end to end vs the bare model vs Beam's stock RunInference.

Usage:
    python benchmarks/bench_embed.py                       # fp32 1-4 MP, fp32 4K, bf16 1-4 MP
    python benchmarks/bench_embed.py --scenarios fp32 --count 240

Rows per scenario, all measured in one process on the same corpus:
  (a) bare Keras: model.predict_on_batch on already-decoded SxS uint8 batches (the limit).
  (b) embedpipe: `run_embed` from JPEG files to Parquet on the local FnApiRunner, warm
      (second run in the process: the model is already built, as on a long-running worker).
  (c) stock: Beam RunInference + TFModelHandlerNumpy (SAVED_WEIGHTS, create_model_fn) after
      plain Pillow decoding (no draft mode): what a user would write instead.
Each row prints img/s and its ratio to (a). Peak RSS of the process is printed after each row.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time
import types

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCENARIOS = {
    "fp32": dict(precision="fp32", megapixels=(1.0, 4.0)),
    "fp32-4k": dict(precision="fp32", megapixels=(8.3, 8.3)),
    "bf16": dict(precision="bf16", megapixels=(1.0, 4.0)),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def corpus(folder: pathlib.Path, count: int, megapixels: tuple[float, float]) -> list[str]:
    from pipeline.sample import make_corpus

    marker = folder / f".done-{count}-{megapixels}"
    if marker.exists():
        return sorted(str(p) for p in folder.rglob("*.jpg"))
    paths = make_corpus(folder, count=count, megapixels=megapixels, seed=1, with_bad=False)
    marker.write_text("ok")
    return paths


def bare(model_cfg, paths: list[str], batch: int) -> float:
    from pipeline.imaging import decode_image
    from pipeline.model import build_model

    model = build_model(model_cfg)
    pixels = np.stack(
        [
            decode_image(pathlib.Path(p).read_bytes(), size=model_cfg.image_size, max_pixels=10**9)[0]
            for p in paths[: batch * max(1, len(paths) // batch)]
        ]
    )
    model.predict_on_batch(pixels[:batch])  # warm-up: trace + compile
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        model.predict_on_batch(pixels[i : i + batch])
    return len(pixels) / (time.perf_counter() - start)


def embedpipe(model_cfg, folder: pathlib.Path, batch: int, draft: bool = True) -> tuple[float, int]:
    from pipeline.config import EmbedConfig
    from pipeline.job import run_embed

    out = tempfile.mkdtemp(prefix="bench-embed-")
    cfg = EmbedConfig(input=str(folder), output=out, model=model_cfg, batch_size=batch, draft=draft)
    run_embed(cfg, preflight=False)  # cold: builds the model once in this process
    start = time.perf_counter()
    manifest = run_embed(cfg, preflight=False)  # warm
    wall = time.perf_counter() - start
    return manifest["counts"]["embedded"] / wall, manifest["counts"]["embedded"]


def stock(model_cfg, paths: list[str], batch: int) -> float:
    # tensorflow_inference imports tensorflow_hub at top level but the SAVED_WEIGHTS path
    # never uses it; a placeholder module satisfies the import without installing it.
    sys.modules.setdefault("tensorflow_hub", types.ModuleType("tensorflow_hub"))
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.ml.inference.tensorflow_inference import ModelType, TFModelHandlerNumpy
    from PIL import Image

    from pipeline.model import build_model

    weights = os.path.join(tempfile.mkdtemp(), "m.weights.h5")
    build_model(model_cfg).save_weights(weights)
    size = model_cfg.image_size

    def decode(path: str) -> np.ndarray:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)

    handler = TFModelHandlerNumpy(
        weights,
        model_type=ModelType.SAVED_WEIGHTS,
        create_model_fn=lambda: build_model(model_cfg),
        min_batch_size=batch,
        max_batch_size=batch,
    )
    start = time.perf_counter()
    with beam.Pipeline(runner="FnApiRunner") as p:
        _ = (
            p
            | beam.Create(paths)
            | "Decode" >> beam.Map(decode)
            | RunInference(handler)
            | beam.Map(lambda r: np.asarray(r.inference, dtype=np.float32))
        )
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="fp32,fp32-4k,bf16", help=f"comma list of {sorted(SCENARIOS)}")
    parser.add_argument("--count", type=int, default=240, help="JPEGs per corpus (default 240)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-stock", action="store_true", help="skip row (c)")
    parser.add_argument("--no-draft-row", action="store_true", help="skip the full-decode variant of (b)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "embedpipe-bench"))
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.config import ModelConfig

    print(
        f"machine: {os.cpu_count()} CPUs; batch {args.batch_size}; {args.image_size}x{args.image_size}; "
        f"{args.count} JPEGs per corpus",
        flush=True,
    )
    table = []
    for name in args.scenarios.split(","):
        spec = SCENARIOS[name]
        folder = pathlib.Path(args.workdir) / f"corpus-{spec['megapixels'][0]}-{spec['megapixels'][1]}-{args.count}"
        paths = corpus(folder, args.count, spec["megapixels"])
        cfg = ModelConfig(weights="random", image_size=args.image_size, precision=spec["precision"])
        base = bare(cfg, paths, args.batch_size)
        rows = [(f"{name}", "(a) bare Keras predict_on_batch", base)]
        print(f"{name}: (a) {base:.1f} img/s  peak RSS {peak_rss_mb():.0f} MB", flush=True)
        e2e, n = embedpipe(cfg, folder, args.batch_size)
        rows.append((name, "(b) embedpipe embed, end to end", e2e))
        print(f"{name}: (b) {e2e:.1f} img/s over {n} images  peak RSS {peak_rss_mb():.0f} MB", flush=True)
        if not args.no_draft_row:
            full, _ = embedpipe(cfg, folder, args.batch_size, draft=False)
            rows.append((name, "(b') embedpipe, no JPEG draft mode", full))
            print(f"{name}: (b') {full:.1f} img/s  peak RSS {peak_rss_mb():.0f} MB", flush=True)
        if not args.no_stock and spec["precision"] == "fp32":
            st = stock(cfg, paths, args.batch_size)
            rows.append((name, "(c) Beam RunInference + TFModelHandlerNumpy", st))
            print(f"{name}: (c) {st:.1f} img/s  peak RSS {peak_rss_mb():.0f} MB", flush=True)
        table += rows

    print()
    print("| scenario | row | img/s | ratio to (a) |")
    print("|---|---|---:|---:|")
    bases = {s: v for s, r, v in table if r.startswith("(a)")}
    for scenario, row, value in table:
        print(f"| {scenario} | {row} | {value:.1f} | {value / bases[scenario]:.2f} |")
    if "fp32" in bases and "bf16" in bases:
        e2e = {s: v for s, r, v in table if r.startswith("(b)")}
        print(f"\nbf16 / fp32 end to end: {e2e['bf16'] / e2e['fp32']:.2f}x")
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
