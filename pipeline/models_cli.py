"""`embedpipe models`: the models --model takes, with their vector widths and input sizes; a saved model's layers.

The list comes from the table in pipeline/applications.py: nothing is built or imported to print
it. With `--model PATH.keras` the saved model is loaded (TensorFlow, seconds) to list the layers
--layer can name, each with its output shape and the vector it would give.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from pipeline.applications import APPLICATIONS, DEFAULT_MODEL, is_saved_model
from pipeline.errors import UsageError


def add_models_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `models` subcommand (func=cmd_models) to the `embedpipe` parser."""
    p = subparsers.add_parser(
        "models",
        help="list the models --model takes (vector width, input size), or a saved model's layers",
        description="List the Keras applications --model takes, cut without their classifier, with the width "
        "of their vectors and their default input size. With --model PATH.keras, list the layers of a saved "
        "model that --layer can name.",
    )
    p.add_argument("--model", default=None, metavar="PATH.keras", help="a saved Keras model: list its layers")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)
    return p


def application_rows() -> list[dict]:
    """One row per application: what `embedpipe models` prints."""
    return [
        {
            "model": app.name,
            "default": app.name == DEFAULT_MODEL,
            "dim": app.dim,
            "default_size": app.default_size,
            "min_size": app.min_size,
            "preprocessing": app.preprocessing,
            "keras": f"keras.applications.{app.keras_name}",
        }
        for app in APPLICATIONS.values()
    ]


def cmd_models(args: argparse.Namespace, beam_args: list[str], out: TextIO | None = None) -> None:
    """Print the applications, or the layers of `--model PATH.keras`."""
    out = out or sys.stdout
    if args.model is None:
        rows = application_rows()
        if args.json:
            print(json.dumps(rows, indent=2), file=out)
            return
        print(f"{'MODEL':<20} {'DIM':>5} {'SIZE':>5}  PREPROCESSING (inside the graph, uint8 RGB in)", file=out)
        for row in rows:
            name = row["model"] + (" (default)" if row["default"] else "")
            print(f"{name:<20} {row['dim']:>5} {row['default_size']:>5}  {row['preprocessing']}", file=out)
        print(
            "\nSIZE is the default --image-size (any size >= 32 works). Also: --model PATH.keras, a saved model "
            "cut at --layer; `embedpipe models --model PATH.keras` lists its layers.",
            file=out,
        )
        return
    if not is_saved_model(args.model):
        raise UsageError(f"--model {args.model!r}: give the path of a saved Keras model (.keras) to list its layers")
    from pipeline.options.runner import use_filesystem_options
    from pipeline.saved_model import describe_layers

    use_filesystem_options(beam_args)  # credentials and endpoints of a remote PATH
    layers = describe_layers(args.model)
    if args.json:
        print(json.dumps(layers, indent=2, default=list), file=out)
        return
    width = max(len(row["layer"]) for row in layers) if layers else 5
    print(f"{'LAYER':<{width}}  {'TYPE':<24} {'OUTPUT SHAPE':<22} AS --layer", file=out)
    for row in layers:
        shape = "-" if row["output_shape"] is None else str(row["output_shape"])
        print(f"{row['layer']:<{width}}  {row['type']:<24} {shape:<22} {row['embeds']}", file=out)
