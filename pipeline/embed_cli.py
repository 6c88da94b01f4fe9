"""`embedpipe embed`: its parser, and what a run prints (the summary, or the plan of --dry-run)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from pipeline.errors import UsageError
from pipeline.options.embedding import add_embedding_options, embed_config


class EmptyInputError(UsageError):
    """Input paths that hold no image at all: the run is whole, but a typo must never look like success."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(f"an input holds no image: {m}" for m in messages))
        self.messages = messages


def add_embed_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `embed` subcommand (func=cmd_embed) to the `embedpipe` parser."""
    p = subparsers.add_parser(
        "embed",
        help="embed every image under --input into Parquet",
        description="Read images, decode and resize them, run the model (--model: a headless ResNet50 by "
        "default) and write "
        "OUTPUT/embeddings/*.parquet, OUTPUT/errors/*.parquet and OUTPUT/manifest.json. "
        "Any option not listed here is passed to Beam unchanged, e.g. --runner DataflowRunner.",
    )
    p.add_argument("--output", required=True, help="output directory (embeddings/, errors/, manifest.json)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output that embedpipe did not write (default: refuse; embedpipe "
        "replaces only embeddings/*.parquet, errors/*.parquet and manifest.json there)",
    )
    add_embedding_options(p)
    p.set_defaults(func=cmd_embed)
    return p


def cmd_embed(args: argparse.Namespace, beam_args: list[str]) -> None:
    """Run `embedpipe embed` (or print its plan with --dry-run); EmptyInputError after the summary of a run
    in which an input path held no image."""
    from pipeline.job import run_embed
    from pipeline.plan import plan_embed

    cfg = embed_config(args, output=args.output)
    if args.dry_run:
        print_plan(plan_embed(cfg, beam_args, workers=args.workers, require_gpu=args.require_gpu))
        return
    manifest = run_embed(cfg, beam_args, workers=args.workers, require_gpu=args.require_gpu, overwrite=args.overwrite)
    print_summary(manifest)
    if manifest.get("empty_inputs"):
        raise EmptyInputError(manifest["empty_inputs"])


def print_summary(manifest: dict, out: TextIO | None = None) -> None:
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


def print_plan(plan: dict, out: TextIO | None = None) -> None:
    """What --dry-run shows: resolved options, model, transform graph."""
    out = out or sys.stdout
    print(
        json.dumps({k: v for k, v in plan.items() if k != "transforms"}, indent=2, sort_keys=True, default=str),
        file=out,
    )
    print("transforms:", file=out)
    for line in plan["transforms"]:
        print(f"  {line}", file=out)
