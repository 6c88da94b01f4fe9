"""The `embedpipe` command: parses arguments and calls build_*/run_* functions, nothing else."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback

from pipeline import __version__
from pipeline.config import (
    DECODE_STAGES,
    DECODERS,
    DEFAULT_MAX_PIXELS,
    POOLINGS,
    PRECISIONS,
    RESIZE_MODES,
    EmbedConfig,
    ModelConfig,
)
from pipeline.options import UsageError, check_beam_args
from pipeline.quiet import silence_by_default

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
    g.add_argument(
        "--jit",
        choices=("auto", "on", "off"),
        default="auto",
        help="compile the model with XLA (default auto: on for CPU workers at image size >= 224 and "
        "batch >= 16, off on GPUs)",
    )


def _add_embed_args(p: argparse.ArgumentParser, *, output: bool = True) -> None:
    from pipeline.read import add_input_arguments

    p.add_argument(
        "--input",
        required=True,
        help="directory, glob, or comma-separated list of image folders or shards: WebDataset tar, TFRecord, "
        "Parquet with image bytes, URI lists (local, gs://, s3://; docs/INPUT_FORMATS.md)",
    )
    if output:
        p.add_argument("--output", required=True, help="output directory (embeddings/, errors/, manifest.json)")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="write into a non-empty --output that embedpipe did not write (default: refuse; embedpipe "
            "replaces only embeddings/*.parquet, errors/*.parquet and manifest.json there)",
        )
    add_input_arguments(p)
    _add_model_args(p)
    g = p.add_argument_group("execution")
    g.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="images per inference batch (default: 32 on CPU; 128 when the job asks for GPUs via "
        "--require-gpu or a worker_accelerator service option)",
    )
    g.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    g.add_argument(
        "--threads-per-worker", type=int, default=0, help="TensorFlow intra-op threads per worker (default: TF decides)"
    )
    g.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="image decoding threads per worker process (default 0: one per CPU core)",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"larger images are errors (default {DEFAULT_MAX_PIXELS:,})",
    )
    g.add_argument("--max-bytes", type=int, default=256 * 1024 * 1024, help="larger files are errors (default 256 MiB)")
    g.add_argument("--no-draft", action="store_true", help="always decode JPEGs at full size (slower)")
    g.add_argument(
        "--decode",
        choices=DECODERS,
        default="auto",
        help="where JPEGs are decoded: auto (default: on the GPU when the worker has one and nvImageCodec, "
        "`pip install embedpipe[gpu]`, imports; else on the CPU), cpu, gpu (fails at start-up without both)",
    )
    g.add_argument(
        "--decode-stage",
        choices=DECODE_STAGES,
        default="fused",
        help="fused (default): decode beside inference on each worker; separate: decode in a stage of its own "
        "(CPU workers) and shuffle the pixels to the inference stage, which alone asks for the GPU "
        "(Dataflow right fitting; docs/COST.md says when it pays)",
    )
    g.add_argument(
        "--decode-machine-type",
        default=None,
        metavar="TYPE",
        help="with --decode-stage separate on Dataflow: machine type of the decode workers (default: Dataflow's)",
    )
    g.add_argument("--thumbnails", action="store_true", help="store a small JPEG thumbnail per image (for `serve`)")
    g.add_argument("--require-gpu", action="store_true", help="fail at worker start-up when no GPU is visible")
    g.add_argument(
        "--dry-run", action="store_true", help="print the resolved options and the transform graph; run nothing"
    )


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig of parsed model arguments (see _add_model_args)."""
    return ModelConfig(
        image_size=args.image_size,
        pooling=args.pooling,
        weights=args.weights,
        seed=args.seed,
        resize=args.resize,
        precision=args.precision,
        jit={"auto": None, "on": True, "off": False}[args.jit],
    )


def _embed_config(args: argparse.Namespace) -> EmbedConfig:
    model = model_config(args)
    threads = args.threads_per_worker
    from pipeline.read import input_spec_from_args

    return EmbedConfig(
        input=input_spec_from_args(args),
        output=getattr(args, "output", None) or "",
        model=model,
        batch_size=args.batch_size,
        max_pixels=args.max_pixels,
        max_bytes=args.max_bytes,
        draft=not args.no_draft,
        thumbnails=args.thumbnails,
        intra_op_threads=threads,
        decode_threads=args.decode_threads,
        decode=args.decode,
        decode_stage=args.decode_stage,
        decode_machine_type=args.decode_machine_type,
    )


def print_summary(manifest: dict, out=None) -> None:
    """The end-of-run account: counts, reasons, time, throughput, where the output is."""
    out = out or sys.stdout
    c = manifest["counts"]
    print("", file=out)
    print(f"embedpipe: done in {manifest['wall_seconds']:.1f}s", file=out)
    print(f"  seen      {c['seen']}", file=out)
    print(f"  embedded  {c['embedded']}", file=out)
    if c.get("reused"):
        print(f"  reused    {c['reused']}", file=out)
        if c.get("reused_by_marker"):
            print(f"    by marker {c['reused_by_marker']} (size and mtime unchanged: not read)", file=out)
    print(f"  failed    {c['failed']}", file=out)
    for reason, n in manifest.get("failed_by_reason", {}).items():
        print(f"    {reason:<18} {n}", file=out)
    if manifest.get("images_per_second"):
        print(f"  speed     {manifest['images_per_second']:.1f} img/s (wall clock, start-up included)", file=out)
    print(f"  model     {manifest['model']}", file=out)
    print(f"  output    {manifest['output']}/embeddings/  (errors/, manifest.json)", file=out)


def print_plan(plan: dict, out=None) -> None:
    """What --dry-run shows: resolved options, model, transform graph."""
    out = out or sys.stdout
    print(
        json.dumps({k: v for k, v in plan.items() if k != "transforms"}, indent=2, sort_keys=True, default=str),
        file=out,
    )
    print("transforms:", file=out)
    for line in plan["transforms"]:
        print(f"  {line}", file=out)


def cmd_embed(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipeline.job import plan_embed, run_embed

    cfg = _embed_config(args)
    if args.dry_run:
        print_plan(plan_embed(cfg, beam_args, workers=args.workers, require_gpu=args.require_gpu))
        return 0
    manifest = run_embed(cfg, beam_args, workers=args.workers, require_gpu=args.require_gpu, overwrite=args.overwrite)
    print_summary(manifest)
    for message in manifest.get("empty_inputs") or ():
        # The run itself is whole (every input has its row), but a path that holds no image is
        # almost always a typo or the wrong --input-format: never a silent success.
        print(f"embedpipe: error: an input holds no image: {message}", file=sys.stderr)
    return 2 if manifest.get("empty_inputs") else 0


def cmd_nightly(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipeline.job import plan_embed
    from pipeline.lock import LockHeldError
    from pipeline.nightly import NightlyConfig, ValidationError, run_nightly

    cfg = NightlyConfig(
        root=args.root,
        embed=_embed_config(args),
        run_id=args.run_id,
        full=args.full,
        keep=args.keep,
        index=args.index,
        metric=args.metric,
        memory_budget=args.memory_budget,
        recall_floor=args.recall_floor,
        workers=args.workers,
        require_gpu=args.require_gpu,
        verify_content=args.verify_content,
        overwrite=args.overwrite,
        lock=not args.no_lock,
        lock_stale_after=args.lock_stale_after,
        report=not args.no_report,
    )
    if args.dry_run:
        embed_cfg = dataclasses.replace(cfg.embed, output=f"{args.root.rstrip('/')}/runs/<run-id>")
        print_plan(plan_embed(embed_cfg, beam_args, workers=args.workers, require_gpu=args.require_gpu))
        return 0
    try:
        manifest = run_nightly(cfg, beam_args)
    except ValidationError as exc:
        print(f"embedpipe nightly: NOT published: {exc}", file=sys.stderr)
        return 3
    except LockHeldError as exc:
        print(f"embedpipe nightly: {exc}", file=sys.stderr)
        return 4
    print_summary(manifest)
    c = manifest["counts"]
    print(f"  deleted   {c['deleted']}")
    print(
        f"  index     {manifest['index']['index_type']} ntotal={manifest['index']['ntotal']} "
        f"recall@10={manifest['index']['recall_at_10']}"
    )
    print(f"  published {args.root.rstrip('/')}/runs/{manifest['run_id']} (LATEST)")
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

    nightly = sub.add_parser(
        "nightly",
        help="one night's incremental re-embedding + index, published atomically under --root",
        description="Embed --input into ROOT/runs/<run-id>/, reusing the LATEST run's embeddings of unchanged "
        "images (same id, same sha256, same model; plain files whose size and mtime are unchanged are not even "
        "read), build the index, validate, and only then point ROOT/LATEST "
        "at the new run. One run at a time per root (ROOT/nightly.lock). Exit 3 when the run is not published "
        "(validation failed, or a later run published first: LATEST unchanged), 4 when another run holds the "
        "lock. Other options go to Beam.",
    )
    _add_embed_args(nightly, output=False)
    n = nightly.add_argument_group("nightly")
    n.add_argument("--root", required=True, help="run root (local, gs://, s3://): runs/<run-id>/ and LATEST")
    n.add_argument("--run-id", default=None, help="run id (default: UTC timestamp, e.g. 20261128T020000Z)")
    n.add_argument("--full", action="store_true", help="re-embed everything, reuse nothing")
    n.add_argument(
        "--verify-content",
        action="store_true",
        help="read and hash every file even when its size and mtime are unchanged (default: trust those change "
        "markers and skip reading unchanged files; docs/DESIGN-NOTES.md, 'Change markers')",
    )
    n.add_argument(
        "--keep",
        type=int,
        default=0,
        help="after publishing, keep only the newest N runs (0: keep all); only folders that are embedpipe runs "
        "are counted and pruned",
    )
    n.add_argument(
        "--overwrite",
        action="store_true",
        help="use a non-empty --root that embedpipe did not create (default: refuse)",
    )
    n.add_argument(
        "--no-lock",
        action="store_true",
        help="do not take ROOT/nightly.lock (needed on roots other than local and gs://); you then make sure "
        "only one nightly run uses the root at a time",
    )
    n.add_argument(
        "--lock-stale-after",
        type=float,
        default=7200.0,
        metavar="SECONDS",
        help="gs:// roots: a lock whose heartbeat is older than this belongs to a dead run and is broken "
        "(default 7200: 2 h; the holder rewrites it every 5 min)",
    )
    n.add_argument("--index", default="auto", help="index type (auto|flat|ivf-flat|ivf-sq8|ivf-pq|hnsw|factory string)")
    n.add_argument("--metric", choices=("cosine", "l2"), default="cosine", help="index metric (default cosine)")
    n.add_argument("--memory-budget", default="4GB", help="memory the index may use (default 4GB)")
    n.add_argument(
        "--recall-floor", type=float, default=0.9, help="refuse to publish an index below this recall@10 (default 0.9)"
    )
    n.add_argument(
        "--no-report",
        action="store_true",
        help="do not write runs/<run-id>/report.html after publishing (default: write it; docs/REPORT.md)",
    )
    nightly.set_defaults(func=cmd_nightly)

    from pipeline.index.cli_build import add_index_parser

    add_index_parser(sub)
    from pipeline.index.query_cli import add_query_parser
    from pipeline.serve.cli import add_serve_parser

    add_query_parser(sub)
    add_serve_parser(sub)
    from pipeline.index.duplicates_page import add_duplicates_parser
    from pipeline.report import add_report_parser

    add_duplicates_parser(sub)
    add_report_parser(sub)

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
    for command in sub.choices.values():  # `embedpipe embed ... -v` works as well as `embedpipe -v embed ...`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    parser.commands = dict(sub.choices)  # for main(): the options a subcommand knows (suggestions)
    return parser


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the innermost line of its text (Beam nests tracebacks in it)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    nested = "Traceback (most recent call last)" in str(exc)
    text = (lines[-1] if nested else lines[0]) if lines else ""
    text = text if len(text) <= 500 else text[:497] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `embedpipe` console script."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    stray = [a for a in beam_args if not a.startswith("-")]
    if stray and not any(a.startswith("--") for a in beam_args):
        parser.error(f"unrecognised arguments: {' '.join(stray)}")
    try:
        check_beam_args(parser.commands[args.command], beam_args)
    except UsageError as exc:
        print(f"embedpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    silence_by_default(args.verbose)  # before anything imports TensorFlow (local workers inherit it)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipeline.job import CountsMismatchError
    from pipeline.model import WeightsUnavailableError

    try:
        return args.func(args, beam_args)
    except (WeightsUnavailableError, ValueError) as exc:
        print(f"embedpipe: error: {exc}", file=sys.stderr)
        return 2
    except CountsMismatchError as exc:
        print(f"embedpipe: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # anything unforeseen: one line, the traceback only when asked for
        if args.verbose:
            traceback.print_exc()
            print(f"embedpipe: error: {_one_line(exc)}", file=sys.stderr)
        else:
            print(f"embedpipe: error: {_one_line(exc)} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
