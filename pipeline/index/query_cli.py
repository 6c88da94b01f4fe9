"""`embedpipe query`: nearest neighbours of images or stored ids, as a table or JSON lines."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TextIO

from pipeline.errors import UsageError
from pipeline.options.embedding import add_size_limits
from pipeline.options.indexing import add_index_dir_option
from pipeline.options.runner import use_filesystem_options


def add_query_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `query` subcommand (func=cmd_query) to the `embedpipe` parser."""
    p = subparsers.add_parser(
        "query",
        help="nearest neighbours of images or ids in an index",
        description="Search an index directory (the output of `embedpipe index`) by query images, which are "
        "embedded with exactly the model the index records, or by ids already in the index (the item itself "
        "is always hit 1). Scores: cosine similarity (higher is closer) or L2 distance (lower is closer).",
    )
    add_index_dir_option(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", nargs="+", metavar="PATH", help="query image file(s) (any Beam filesystem)")
    what.add_argument("--id", nargs="+", metavar="ID", help="id(s) of items in the index")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON object per hit and line instead of a table")
    add_size_limits(p, what="query image", then="are refused")
    p.set_defaults(func=cmd_query)
    return p


def _print_table(query: str, hits: list, metric: str, out: TextIO) -> None:
    score_name = "cosine" if metric == "cosine" else "l2 dist"
    print(f"query {query}", file=out)
    id_width = max([len("id"), *(len(h.id) for h in hits)])
    print(f"  {'rank':>4}  {score_name:>8}  {'id':<{id_width}}  uri", file=out)
    for h in hits:
        print(f"  {h.rank:>4}  {h.score:>8.4f}  {h.id:<{id_width}}  {h.uri}", file=out)
    if not hits:
        print("  (no results)", file=out)
    print("", file=out)


def cmd_query(args: argparse.Namespace, beam_args: list[str], out: TextIO | None = None) -> None:
    """Run one `embedpipe query` (results to `out`, default stdout); a bad query raises (UsageError and kin)."""
    from pipeline.index.search import Searcher

    if args.k < 1:
        raise UsageError(f"-k must be >= 1; got {args.k}")
    if args.max_bytes < 1 or args.max_pixels < 1:
        raise UsageError("--max-bytes and --max-pixels must be >= 1")
    use_filesystem_options(beam_args)  # credentials and settings (e.g. --s3_endpoint_url) of remote indexes
    with Searcher.open(args.index, max_pixels=args.max_pixels) as searcher:
        searcher.query_model.max_bytes = args.max_bytes
        if args.image:
            queries, results = args.image, searcher.search_images(args.image, k=args.k)
        else:
            queries, results = args.id, searcher.search_ids(args.id, k=args.k)
        metric = searcher.meta["metric"]
    out = out or sys.stdout
    kind = "image" if args.image else "id"
    for query, hits in zip(queries, results):
        if args.json:
            for h in hits:
                print(json.dumps({"query": query, "query_type": kind, **dataclasses.asdict(h)}), file=out)
        else:
            _print_table(query, hits, metric, out)
