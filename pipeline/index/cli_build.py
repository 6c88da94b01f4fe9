"""`embedpipe index`: argument parsing and the end-of-build summary; the work is in build / distributed."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.options.indexing import add_index_options, index_config
from pipeline.options.runner import add_workers_option

log = logging.getLogger(__name__)


def add_index_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `index` subcommand (func=cmd_index) to the `embedpipe` parser."""
    p = subparsers.add_parser(
        "index",
        help="build a FAISS index of an embeddings dataset",
        description="Stream OUTPUT/embeddings/*.parquet into a FAISS index sized for the corpus and write "
        "DIR/index.faiss, DIR/ids.parquet and DIR/index.json (recall@10 measured against exact search). "
        "With --distributed, any option not listed here is passed to Beam unchanged (--runner, ...).",
    )
    p.add_argument(
        "--embeddings",
        required=True,
        help="output directory of `embedpipe embed` (holding embeddings/ and manifest.json), or its "
        "embeddings/ folder; local, gs://, s3://",
    )
    p.add_argument("--output", required=True, help="index directory to create or replace (replaced only when whole)")
    p.add_argument(
        "--allow-no-manifest",
        action="store_true",
        help="index embeddings that have no manifest.json (default: refuse, since `embedpipe embed` writes the "
        "manifest last and a folder without one is unfinished or was not made by embedpipe)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="add the vectors file by file in a Beam pipeline and merge the shard indexes (IVF types; "
        "flat and HNSW are built in one process)",
    )
    add_workers_option(p, what=" for --distributed without --runner")
    add_index_options(p, seed_alias=True)
    p.set_defaults(func=cmd_index)
    return p


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1000
    return f"{n} B"


def print_index_summary(meta: dict, output: str, out=None) -> None:
    """What was built, how good it is, how big, and where."""
    out = out or sys.stdout  # looked up per call: a default bound at import outlives redirected streams
    params = ", ".join(f"{k}={v}" for k, v in meta["search_params"].items()) or "exact"
    print("", file=out)
    print(
        f"embedpipe index: {meta['index_type']} ({meta['factory']}, {meta['metric']}) in {meta['build_seconds']:.1f}s",
        file=out,
    )
    print(f"  vectors    {meta['ntotal']} x {meta['dim']}", file=out)
    print(f"  recall@10  {meta['recall_at_10']:.3f} on {meta['recall_queries']} held-out queries ({params})", file=out)
    print(f"  size       {_size(meta['bytes'])}", file=out)
    print(f"  model      {meta['model']}", file=out)
    print(f"  output     {output.rstrip('/')}/  (index.faiss, ids.parquet, index.json)", file=out)


def cmd_index(args: argparse.Namespace, beam_args: list[str]) -> None:
    """Run `embedpipe index` and print its summary."""
    from pipeline.index.io import resolve_embeddings

    config = index_config(args)  # bad options are refused before any work, as is a folder without a manifest
    resolve_embeddings(args.embeddings, require_manifest=not args.allow_no_manifest)
    if args.distributed:
        from pipeline.index.distributed import build_index_distributed

        meta = build_index_distributed(args.embeddings, args.output, config, beam_args=beam_args, workers=args.workers)
    else:
        if beam_args:
            log.warning("ignoring %s: Beam options only apply with --distributed", " ".join(beam_args))
        from pipeline.index.build import build_index

        meta = build_index(args.embeddings, args.output, config)
    print_index_summary(meta, args.output)
