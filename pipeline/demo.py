"""`embedpipe demo`: a sample corpus, embedded end to end, no network needed."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from pipeline.config import EmbedConfig
from pipeline.embed_cli import print_summary
from pipeline.errors import WeightsUnavailableError
from pipeline.options.embedding import add_model_options, model_config
from pipeline.options.runner import add_workers_option

_BANNER = "!" * 78


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `demo` subcommand (func=cmd_demo) to the `embedpipe` parser."""
    p = subparsers.add_parser(
        "demo",
        help="embed a generated sample corpus (no network, no account)",
        description="Make a small corpus from photos bundled with scikit-image (plus a few broken "
        "files), embed it and show the result.",
    )
    p.add_argument("--output", default="embedpipe-demo", help="working directory (default ./embedpipe-demo)")
    p.add_argument("--count", type=int, default=24, help="number of sample images (default 24)")
    add_workers_option(p)
    add_model_options(p)
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args: argparse.Namespace, beam_args: list[str]) -> None:
    """Make the sample corpus, embed it, print the summary, build an index and query it."""
    from pipeline.job import run_embed
    from pipeline.sample import make_corpus

    corpus = os.path.join(args.output, "images")
    paths = make_corpus(corpus, count=args.count)
    print(f"embedpipe demo: wrote {len(paths)} sample files to {corpus} (3 of them deliberately broken)")
    model = model_config(args)
    if model.weights == "imagenet":
        from pipeline.model import ensure_weights_available

        try:
            ensure_weights_available(model)
        except WeightsUnavailableError as exc:
            # The demo only: a production run never switches weights silently.
            print(
                f"\n{_BANNER}\nDEMO ONLY: {exc}\nFalling back to RANDOM weights (seed 0). The vectors are NOT "
                f"meaningful; similar images will not be near each other.\n{_BANNER}\n",
                file=sys.stderr,
            )
            model = dataclasses.replace(model, weights="random", seed=0)
    out = os.path.join(args.output, "out")
    cfg = EmbedConfig(input=corpus, output=out, model=model, thumbnails=True)
    manifest = run_embed(cfg, beam_args, workers=args.workers)
    print_summary(manifest)

    from pipeline.index.build import build_index
    from pipeline.index.search import Searcher

    info = build_index(out, os.path.join(out, "index"))
    print(
        f"\nembedpipe demo: index {info['index_type']} ({info['factory']}) of {info['ntotal']} vectors, "
        f"recall@10 {info['recall_at_10']:.3f}, in {os.path.join(out, 'index')}"
    )
    query = sorted(p for p in paths if "/bad/" not in p.replace(os.sep, "/"))[0]
    searcher = Searcher.open(os.path.join(out, "index"))
    print(f"nearest neighbours of {query}:")
    for hit in searcher.search_images([query], k=5)[0]:
        print(f"  {hit.rank}. {hit.score:.4f}  {hit.id}")
    print(
        f"\nnext: embedpipe query --index {os.path.join(out, 'index')} --image {query}\n"
        f"      embedpipe serve --index {os.path.join(out, 'index')}   (then open http://127.0.0.1:8000/)"
    )
