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
    cfg = EmbedConfig(input=corpus, output=os.path.join(args.output, "out"), model=model)
    manifest = run_embed(cfg, beam_args, workers=args.workers)
    print_summary(manifest)
    return 0
