"""The runner group: local worker processes, and the options that are Beam's, not embedpipe's.

`embedpipe` hands every option it does not define to Beam (`--runner`, `--project`,
`--temp_location`, ...). Beam itself only logs "Discarding unparseable args" for one it does
not know either, so a typo (`--batchsize 8`) would silently run a night's job with the default.
Here the leftovers are parsed against every option of every `PipelineOptions` class Beam has
loaded (its own, its runners', and any a user's plug-in registered), and anything left is a
usage error naming the closest option of either kind. Commands that run no pipeline (query,
serve, report, duplicates) still take Beam's filesystem options: credentials and endpoints of
remote indexes, images and run roots.
"""

from __future__ import annotations

import argparse
import difflib

from pipeline.errors import UsageError


def add_workers_option(parser: argparse.ArgumentParser, *, what: str = "") -> None:
    """--workers: local worker processes of the pipeline (local runners; `what` says when it applies)."""
    parser.add_argument("--workers", type=int, default=1, help=f"local worker processes{what} (default 1)")


def use_filesystem_options(beam_args: list[str]) -> None:
    """Hand Beam options (e.g. --s3_endpoint_url, credentials) to Beam's filesystems for this process."""
    if not beam_args:
        return
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    FileSystems.set_options(PipelineOptions(beam_args))


def beam_option_names() -> list[str]:
    """Every `--option` Beam's PipelineOptions classes define, as Beam's own parser collects them."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _beam_parser(PipelineOptions, _BeamArgumentParser)
    return sorted({s for action in parser._actions for s in action.option_strings if s.startswith("--")})


def _beam_parser(base, parser_class) -> argparse.ArgumentParser:
    # What PipelineOptions.get_all_options does: each direct subclass adds its arguments once.
    parser = parser_class(allow_abbrev=False)
    for cls in {str(c): c for c in base.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


def check_beam_args(command: argparse.ArgumentParser, beam_args: list[str]) -> None:
    """Raise UsageError unless every option in `beam_args` is one Beam parses.

    Args:
        command: the subcommand's own parser (its options are offered as suggestions too).
        beam_args: what the subcommand's parser did not recognise.
    """
    if not beam_args:
        return
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    _, unknown = _beam_parser(PipelineOptions, _BeamArgumentParser).parse_known_args(beam_args)
    flags = [a for a in unknown if a.startswith("-")]
    if not flags:
        if unknown:
            raise UsageError(f"unexpected argument(s): {' '.join(unknown)}")
        return
    name = flags[0].split("=", 1)[0]
    own = sorted({s for action in command._actions for s in action.option_strings if s.startswith("--")})
    known = own + beam_option_names()
    # Compare without the - / _ difference (Beam spells options with _, embedpipe with -).
    canonical = {k.replace("_", "-"): k for k in known}
    close = difflib.get_close_matches(name.replace("_", "-"), list(canonical), n=1, cutoff=0.6)
    hint = f"; did you mean {canonical[close[0]]}?" if close else ""
    more = f" (and {len(flags) - 1} more)" if len(flags) > 1 else ""
    raise UsageError(
        f"unknown option {name}{more}{hint} (options that are not embedpipe's go to Beam, and Beam does not know "
        "this one either)"
    )
