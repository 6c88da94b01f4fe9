"""Dollars per million images on Dataflow for three ways to feed a GPU worker (docs/COST.md).

(a) fused: JPEGs decoded on the GPU worker's own vCPUs (Pillow, draft mode), model on its GPU;
(b) gpu-decode: JPEGs decoded on the GPU itself (nvImageCodec, pipeline.gpu_decode);
(c) split: CPU-only decode workers, sized to the GPU's appetite, send 224x224 pixels through
    Dataflow Shuffle to GPU workers that only run the model.

Every input is printed with where it comes from: measured in this repo, a list price to check
before use, or an estimate (and how it was made). Override any of them:

    python benchmarks/cost_model.py --set gpu_decode_img_s.h100=4200 --set price.l4_gpu_h=0.6
    python benchmarks/cost_model.py --measure-shuffle      # bytes per image of the decoded pixels

Formulas (per worker; a worker runs at the speed of its slowest stage):
    img/s (a) = min(model img/s, vCPUs x decode img/s per vCPU)
    img/s (b) = min(model img/s, GPU decode img/s)
    $/h of a worker = vCPUs x vCPU price + GB x memory price + GPU price
    $/M images (a), (b) = $/h / (img/s x 3600) x 1e6
    $/M images (c) = GPU worker $/h / (model img/s x 3600) x 1e6
                   + CPU $/vCPU-h (memory included) / (decode img/s per vCPU x 3600) x 1e6
                   + shuffle bytes per image x 1e6 / 1e9 x shuffle $/GB
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PRICES_READ = "list prices as remembered for us-central1 (not re-read in this repo; check before use)"


@dataclasses.dataclass
class Figure:
    """One input of the model, with where it comes from."""

    value: float
    unit: str
    source: str


# H200 figures scaled to other GPUs by the ratio of their dense tensor-core throughput
# (datasheets: H100 SXM and H200 989 TFLOP/s bf16/fp16 and 495 TF32; A100 312 / 156; L4 121 / 60).
# The H200's extra memory bandwidth is worth little at batch 256 (compute-bound): H100 = 0.9 x H200.
SCALE = {"h100": 0.9, "a100": 312 / 989, "l4": 121 / 989}
H200_MODEL = {"fp32": 16579, "bf16": 25964, "fp16": 30029}  # docs/GPU.md, Keras on JAX, batch 256

INPUTS: dict[str, Figure] = {
    "decode_img_s_per_vcpu": Figure(
        51, "img/s", "measured: docs/GPU.md, 1-4 MP JPEGs at 224 px, draft on, pool of 15 on a 16-vCPU host"
    ),
    "price.vcpu_h": Figure(0.056, "$/vCPU-h", f"Dataflow batch worker vCPU, {PRICES_READ}"),
    "price.gb_h": Figure(0.003557, "$/GB-h", f"Dataflow batch worker memory, {PRICES_READ}"),
    "price.shuffle_gb": Figure(0.011, "$/GB", f"Dataflow Shuffle data processed (batch), {PRICES_READ}"),
    "price.l4_gpu_h": Figure(0.56, "$/GPU-h", f"NVIDIA L4, {PRICES_READ}"),
    "price.a100_gpu_h": Figure(2.93, "$/GPU-h", f"NVIDIA A100 40GB, {PRICES_READ}"),
    "price.h100_gpu_h": Figure(9.80, "$/GPU-h", f"NVIDIA H100 80GB, {PRICES_READ}"),
    "cpu_worker_gb_per_vcpu": Figure(4, "GB", "n2-standard shape of the CPU decode workers of (c)"),
    "shuffle_bytes": Figure(150528, "B/image", "224 x 224 x 3 uint8 (--measure-shuffle: lossless encodings)"),
    # GPU decode speed: to be measured on the GPU check ("nvImageCodec batch decode alone" and
    # "bytes -> GPU decode -> model -> vectors"); until then placeholders, clearly not measurements.
    "gpu_decode_img_s.h100": Figure(2000, "img/s", "ESTIMATE, to be measured (GPU check on the H200)"),
    "gpu_decode_img_s.a100": Figure(1000, "img/s", "ESTIMATE, to be measured (H100 placeholder / 2)"),
    "gpu_decode_img_s.l4": Figure(500, "img/s", "ESTIMATE, to be measured (H100 placeholder / 4)"),
}
for gpu, factor in SCALE.items():
    for precision, img_s in H200_MODEL.items():
        INPUTS[f"model_img_s.{gpu}.{precision}"] = Figure(
            round(img_s * factor), "img/s", f"ESTIMATE: H200 {precision} {img_s} img/s (docs/GPU.md) x {factor:.3f}"
        )

# Dataflow GPU worker shapes: (machine type, vCPUs, GB of memory, GPU price key)
WORKERS = {
    "l4": ("g2-standard-8", 8, 32, "price.l4_gpu_h"),
    "a100": ("a2-highgpu-1g", 12, 85, "price.a100_gpu_h"),
    "h100": ("a3-highgpu-1g", 26, 234, "price.h100_gpu_h"),
}


def value(inputs: dict[str, Figure], key: str) -> float:
    """An input's value."""
    return inputs[key].value


def costs(inputs: dict[str, Figure], gpu: str, precision: str) -> tuple[list[dict], dict]:
    """The three designs for one GPU worker and precision (img/s per GPU worker, $/M images, what
    limits it), and the worker (machine type, $/h)."""
    machine, vcpus, gb, gpu_price = WORKERS[gpu]
    worker_h = vcpus * value(inputs, "price.vcpu_h") + gb * value(inputs, "price.gb_h") + value(inputs, gpu_price)
    model = value(inputs, f"model_img_s.{gpu}.{precision}")
    per_vcpu = value(inputs, "decode_img_s_per_vcpu")
    gpu_decode = value(inputs, f"gpu_decode_img_s.{gpu}")

    def per_million(dollars_h: float, img_s: float) -> float:
        return dollars_h / (img_s * 3600) * 1e6

    fused = min(model, vcpus * per_vcpu)
    on_gpu = min(model, gpu_decode)
    cpu_vcpu_h = value(inputs, "price.vcpu_h") + value(inputs, "cpu_worker_gb_per_vcpu") * value(inputs, "price.gb_h")
    shuffle = value(inputs, "shuffle_bytes") * 1e6 / 1e9 * value(inputs, "price.shuffle_gb")
    split_gpu = per_million(worker_h, model)
    split_cpu = per_million(cpu_vcpu_h, per_vcpu)
    rows = [
        {
            "design": "(a) fused CPU decode",
            "img_s": fused,
            "usd_per_m": per_million(worker_h, fused),
            "limit": "decode (vCPUs)" if fused < model else "model",
        },
        {
            "design": "(b) GPU decode",
            "img_s": on_gpu,
            "usd_per_m": per_million(worker_h, on_gpu),
            "limit": "GPU decode (ESTIMATE)" if on_gpu < model else "model",
        },
        {
            "design": "(c) CPU workers + shuffle",
            "img_s": model,
            "usd_per_m": split_gpu + split_cpu + shuffle,
            "limit": f"GPU ${split_gpu:.2f} + decode vCPUs ${split_cpu:.2f} + shuffle ${shuffle:.2f}"
            f" ({model / per_vcpu:.0f} vCPUs per GPU)",
        },
    ]
    # GPU decode speed at which (b) costs what (c) costs: worker $/h / ((c) $/M x 3600) x 1e6.
    breakeven = worker_h / (rows[2]["usd_per_m"] * 3600) * 1e6
    return rows, {"machine": machine, "worker_h": worker_h, "breakeven_img_s": breakeven}


def measure_shuffle(count: int = 24) -> dict[str, float]:
    """Mean bytes per image of decoded 224x224 pixels, raw and losslessly encoded, on sample photos."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from pipeline.imaging import decode_image
    from pipeline.sample import jpeg_bytes, photos, variant

    rng = np.random.default_rng(0)
    pics = list(photos().values())
    sizes: dict[str, list[int]] = {"raw uint8": [], "PNG (zlib 1)": [], "PNG (zlib 6)": [], "WebP lossless": []}
    for i in range(count):
        jpeg = jpeg_bytes(variant(pics[i % len(pics)], rng, float(rng.uniform(1, 4))), quality=90)
        pixels, _, _, _ = decode_image(jpeg, size=224, max_pixels=10**9)
        img = Image.fromarray(pixels)
        sizes["raw uint8"].append(pixels.nbytes)
        for name, kwargs, fmt in (
            ("PNG (zlib 1)", {"compress_level": 1}, "PNG"),
            ("PNG (zlib 6)", {"compress_level": 6}, "PNG"),
            ("WebP lossless", {"lossless": True, "quality": 50}, "WEBP"),
        ):
            buf = io.BytesIO()
            img.save(buf, format=fmt, **kwargs)
            sizes[name].append(len(buf.getvalue()))
    return {name: sum(v) / len(v) for name, v in sizes.items()}


def main(argv: list[str] | None = None) -> None:
    """Print the inputs and the table (or the shuffle measurement)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an input")
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--measure-shuffle", action="store_true", help="bytes per image of decoded pixels, then exit")
    args = p.parse_args(argv)
    if args.measure_shuffle:
        for name, size in measure_shuffle().items():
            print(f"{name:<14} {size:>9,.0f} B/image  ({size / 150528:.2f} of raw)")
        return
    inputs = dict(INPUTS)
    for item in args.set:
        key, _, raw = item.partition("=")
        if key not in inputs:
            raise SystemExit(f"unknown input {key!r}; known: {', '.join(sorted(inputs))}")
        inputs[key] = dataclasses.replace(inputs[key], value=float(raw), source=f"--set {item}")
    print("inputs:")
    for key, fig in inputs.items():
        print(f"  {key:<26} {fig.value:>10g} {fig.unit:<9} {fig.source}")
    print()
    head = f"{'GPU worker':<22} {'prec':<5} {'design':<26} {'img/s/GPU':>9} {'$/M img':>8}  limited by"
    print(head)
    print("-" * len(head))
    for gpu in WORKERS:
        for precision in args.precisions.split(","):
            rows, meta = costs(inputs, gpu, precision)
            name = f"{gpu.upper()} {meta['machine']}"
            for row in rows:
                print(
                    f"{name:<22} {precision:<5} {row['design']:<26} {row['img_s']:>9,.0f} "
                    f"{row['usd_per_m']:>8.2f}  {row['limit']}"
                )
            print(
                f"{'':<22} {'':<5} worker ${meta['worker_h']:.2f}/h; (b) is cheaper than (c) once the GPU "
                f"decodes > {meta['breakeven_img_s']:,.0f} img/s, than (a) once > {rows[0]['img_s']:,.0f}"
            )
    print("\n$/M img: Dataflow charges per million images (compute, GPU, shuffle; not storage or reads).")
    print("Rows marked ESTIMATE use scaled or placeholder figures: see docs/COST.md before quoting them.")


if __name__ == "__main__":
    main()
