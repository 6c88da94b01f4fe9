"""The `embedpipe` command: parses arguments and calls build_*/run_* functions, nothing else."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import __version__
from pipeline.config import DEFAULT_MAX_PIXELS, POOLINGS, PRECISIONS, RESIZE_MODES, EmbedConfig, ModelConfig

log = logging.getLogger("embedpipe")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (all of these go into the model fingerprint)")
    g.add_argument("--image-size", type=int, default=224, help="square input size in pixels, >= 32 (default 224)")
    g.add_argument(
        "--pooling", choices=POOLINGS, default="avg", help="global pooling of the last feature map (default avg)"
    )
    g.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (Keras downloads and caches them), 'random' (seeded; tests only) or PATH "
        "of a weights file of the headless ResNet50 (.weights.h5 or Keras' *_notop.h5; any Beam filesystem)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for --weights random (default 0)")
    g.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default="squash",
        help="squash (default): scale the whole image to SxS, keeping all content (what Keras' "
        "image_dataset_from_directory does); center-crop: scale the short side to S and cut the middle",
    )
    g.add_argument("--precision", choices=PRECISIONS, default="fp32", help="compute precision (default fp32)")
    g.add_argument("--jit", action="store_true", help="compile the model with XLA")


def _add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="directory or glob of images (local, gs://, s3://)")
    p.add_argument("--output", required=True, help="output directory (embeddings/, errors/, manifest.json)")
    _add_model_args(p)
    g = p.add_argument_group("execution")
    g.add_argument("--batch-size", type=int, default=32, help="images per inference batch (default 32)")
    g.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    g.add_argument(
        "--threads-per-worker", type=int, default=0, help="TensorFlow intra-op threads per worker (default: TF decides)"
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"larger images are errors (default {DEFAULT_MAX_PIXELS:,})",
    )
    g.add_argument("--max-bytes", type=int, default=256 * 1024 * 1024, help="larger files are errors (default 256 MiB)")
    g.add_argument("--no-draft", action="store_true", help="always decode JPEGs at full size (slower)")
    g.add_argument("--thumbnails", action="store_true", help="store a small JPEG thumbnail per image (for `serve`)")
    g.add_argument("--require-gpu", action="store_true", help="fail at worker start-up when no GPU is visible")


def _embed_config(args: argparse.Namespace) -> EmbedConfig:
    model = ModelConfig(
        image_size=args.image_size,
        pooling=args.pooling,
        weights=args.weights,
        seed=args.seed,
        resize=args.resize,
        precision=args.precision,
        jit=args.jit,
    )
    threads = args.threads_per_worker
    return EmbedConfig(
        input=args.input,
        output=args.output,
        model=model,
        batch_size=args.batch_size,
        max_pixels=args.max_pixels,
        max_bytes=args.max_bytes,
        draft=not args.no_draft,
        thumbnails=args.thumbnails,
        intra_op_threads=threads,
    )


def print_summary(manifest: dict, out=sys.stdout) -> None:
    """The end-of-run account: counts, reasons, time, throughput, where the output is."""
    c = manifest["counts"]
    print("", file=out)
    print(f"embedpipe: done in {manifest['wall_seconds']:.1f}s", file=out)
    print(f"  seen      {c['seen']}", file=out)
    print(f"  embedded  {c['embedded']}", file=out)
    if c.get("reused"):
        print(f"  reused    {c['reused']}", file=out)
    print(f"  failed    {c['failed']}", file=out)
    for reason, n in manifest.get("failed_by_reason", {}).items():
        print(f"    {reason:<18} {n}", file=out)
    if manifest.get("images_per_second"):
        print(f"  speed     {manifest['images_per_second']:.1f} img/s (wall clock, start-up included)", file=out)
    print(f"  model     {manifest['model']}", file=out)
    print(f"  output    {manifest['output']}/embeddings/  (errors/, manifest.json)", file=out)


def cmd_embed(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipeline.job import run_embed

    manifest = run_embed(_embed_config(args), beam_args, workers=args.workers, require_gpu=args.require_gpu)
    print_summary(manifest)
    return 0


def cmd_demo(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipeline.demo import run_demo

    return run_demo(args, beam_args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="embedpipe",
        description="Batch image embeddings with a headless ResNet50 on Apache Beam, "
        "written as Parquet. Unknown --options are passed to Beam unchanged (--runner, --temp_location, ...).",
    )
    parser.add_argument("--version", action="version", version=f"embedpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = sub.add_parser(
        "embed",
        help="embed every image under --input into Parquet",
        description="Read images, decode and resize them, run the headless ResNet50 and write "
        "OUTPUT/embeddings/*.parquet, OUTPUT/errors/*.parquet and OUTPUT/manifest.json. "
        "Any option not listed here is passed to Beam unchanged, e.g. --runner DataflowRunner.",
    )
    _add_embed_args(embed)
    embed.set_defaults(func=cmd_embed)

    demo = sub.add_parser(
        "demo",
        help="embed a generated sample corpus (no network, no account)",
        description="Make a small corpus from photos bundled with scikit-image (plus a few broken "
        "files), embed it and show the result.",
    )
    demo.add_argument("--output", default="embedpipe-demo", help="working directory (default ./embedpipe-demo)")
    demo.add_argument("--count", type=int, default=24, help="number of sample images (default 24)")
    demo.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    _add_model_args(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `embedpipe` console script."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    stray = [a for a in beam_args if not a.startswith("-")]
    if stray and not any(a.startswith("--") for a in beam_args):
        parser.error(f"unrecognised arguments: {' '.join(stray)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipeline.model import WeightsUnavailableError

    try:
        return args.func(args, beam_args)
    except (WeightsUnavailableError, ValueError) as exc:
        print(f"embedpipe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
