"""The `embedpipe` command: one parser of every subcommand, and the one place errors become exit codes.

Each subcommand's module adds its parser (`add_*_parser`) with `func` set to a function that does
the work and prints its normal output; it raises on failure. `main` parses, checks what goes to
Beam, sets up logging, calls `func`, and turns what it raises into one line on stderr and an exit
code: an EmbedpipeError carries its own (pipeline/errors.py), a ValueError is a bad value (2),
anything else is unforeseen (1, the traceback with -v).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from pipeline import __version__
from pipeline.errors import EmbedpipeError, UsageError
from pipeline.options.indexing import deprecations
from pipeline.options.runner import check_beam_args
from pipeline.quiet import silence_by_default

log = logging.getLogger("embedpipe")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from pipeline.demo import add_demo_parser
    from pipeline.embed_cli import add_embed_parser
    from pipeline.index.cli_build import add_index_parser
    from pipeline.index.duplicates_page import add_duplicates_parser
    from pipeline.index.query_cli import add_query_parser
    from pipeline.models_cli import add_models_parser
    from pipeline.nightly_cli import add_nightly_parser
    from pipeline.report import add_report_parser
    from pipeline.serve.cli import add_serve_parser

    parser = argparse.ArgumentParser(
        prog="embedpipe",
        description="Batch image embeddings with a Keras image model (a headless ResNet50 unless --model says "
        "otherwise) on Apache Beam, "
        "written as Parquet. Unknown --options are passed to Beam unchanged (--runner, --temp_location, ...).",
    )
    parser.add_argument("--version", action="version", version=f"embedpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        add_embed_parser,
        add_nightly_parser,
        add_index_parser,
        add_query_parser,
        add_serve_parser,
        add_duplicates_parser,
        add_report_parser,
        add_demo_parser,
        add_models_parser,
    ):
        add(sub)
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


# Subcommands whose error lines name them; the others keep the plain `embedpipe: error:` they always had.
_NAMED_IN_ERRORS = ("query", "serve", "duplicates", "report")


def fail(exc: Exception, command: str, *, verbose: bool = False, named: bool = False) -> int:
    """Print what went wrong as one line on stderr (a line per item where an error lists several) and
    return the exit code. `named`: the line starts with `embedpipe COMMAND:` even if the command does
    not usually name itself (usage errors of the command line)."""
    label = f"embedpipe {command}" if named or command in _NAMED_IN_ERRORS else "embedpipe"
    if isinstance(exc, EmbedpipeError | ValueError):
        prefix = getattr(exc, "prefix", None) or f"{label}: error"
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"{prefix}: {line}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, EmbedpipeError) else UsageError.exit_code
    if verbose:
        traceback.print_exception(exc)
        print(f"embedpipe: error: {_one_line(exc)}", file=sys.stderr)
    else:
        print(f"embedpipe: error: {_one_line(exc)} (run with -v for the traceback)", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `embedpipe` console script; returns its exit code."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    stray = [a for a in beam_args if not a.startswith("-")]
    if stray and not any(a.startswith("--") for a in beam_args):
        parser.error(f"unrecognised arguments: {' '.join(stray)}")
    try:
        check_beam_args(parser.commands[args.command], beam_args)
    except UsageError as exc:
        return fail(exc, args.command, named=True)
    silence_by_default(args.verbose)  # before anything imports TensorFlow (local workers inherit it)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for note in deprecations(args):
        log.warning("%s", note)
    try:
        args.func(args, beam_args)
    except Exception as exc:
        return fail(exc, args.command, verbose=args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
