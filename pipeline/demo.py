"""`embedpipe demo`: a sample corpus, embedded end to end, no network needed."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from pipeline.config import EmbedConfig

_BANNER = "!" * 78


def run_demo(args: argparse.Namespace, beam_args: list[str]) -> int:
    """Make the sample corpus, embed it, print the summary."""
    from pipeline.cli import model_config, print_summary
    from pipeline.job import run_embed
    from pipeline.model import WeightsUnavailableError
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
    return 0
