"""The index group (`embedpipe index` and `embedpipe nightly`), its IndexConfig, and deprecated spellings.

`--index` names an index *folder* wherever it appears (query, serve, duplicates). The index
*type* is `--index-type`; `index` and `nightly` still accept `--index TYPE` for one release, with
one warning line that says to use `--index-type` (see `deprecations`).
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.config import INDEX_METRICS, IndexConfig
from pipeline.index.auto import INDEX_TYPES

_DEFAULTS = IndexConfig()
_DEPRECATIONS = "deprecated_options"  # the namespace attribute where used old spellings are noted


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: it sets the new option's value and notes one warning for `deprecations`."""

    def __init__(self, option_strings: list[str], dest: str, *, use: str, **kwargs: Any) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)  # the new option's default stands
        super().__init__(option_strings, dest, **kwargs)
        self.use = use

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        notes = list(getattr(namespace, _DEPRECATIONS, ()))
        note = f"{option_string} is deprecated and will be removed in the next release; use {self.use}"
        if note not in notes:
            notes.append(note)
        setattr(namespace, _DEPRECATIONS, notes)


def deprecations(args: argparse.Namespace) -> list[str]:
    """One line per deprecated option spelling the command line used (for the caller to log)."""
    return list(getattr(args, _DEPRECATIONS, ()))


def add_index_dir_option(parser: argparse.ArgumentParser) -> None:
    """--index DIR: the index folder a command reads (query, serve, duplicates)."""
    parser.add_argument(
        "--index",
        required=True,
        metavar="DIR",
        help="index directory, the output of `embedpipe index` (local, gs://, s3://)",
    )


def add_index_options(parser: argparse.ArgumentParser, *, seed_alias: bool = False) -> None:
    """The index group: --index-type (and the deprecated --index), --metric, --memory-budget, seed, recall target.

    `seed_alias`: also accept --seed for --index-seed (`embedpipe index`, where --seed names nothing else).
    """
    g = parser.add_argument_group("index")
    g.add_argument(
        "--index-type",
        default=_DEFAULTS.index_type,
        metavar="TYPE",
        help=f"auto (default: chosen from the vector count and --memory-budget, see docs/INDEX.md), "
        f"{', '.join(INDEX_TYPES)}, or a raw FAISS factory string such as 'IVF1024,SQ8'",
    )
    g.add_argument(
        "--index",
        dest="index_type",
        action=DeprecatedAlias,
        use="--index-type",
        metavar="TYPE",
        help="deprecated spelling of --index-type, accepted for one release (it logs a warning); "
        "--index names an index folder in query, serve and duplicates",
    )
    g.add_argument(
        "--metric",
        choices=INDEX_METRICS,
        default=_DEFAULTS.metric,
        help="cosine (default: vectors L2-normalised, inner product) or l2 (squared Euclidean distance)",
    )
    g.add_argument(
        "--memory-budget",
        default=_DEFAULTS.memory_budget,
        metavar="SIZE",
        help=f"RAM the finished index may use, e.g. 4GB (10^9 bytes), 8GiB, 512MB (default {_DEFAULTS.memory_budget}); "
        "decides what auto picks and the PQ code size",
    )
    seeds = ("--index-seed", "--seed") if seed_alias else ("--index-seed",)
    g.add_argument(
        *seeds,
        dest="index_seed",
        type=int,
        default=_DEFAULTS.seed,
        metavar="N",
        help=f"seed of the training sample, the held-out queries and k-means (default {_DEFAULTS.seed})",
    )
    g.add_argument(
        "--recall-target",
        type=float,
        metavar="RECALL",
        default=_DEFAULTS.recall_target,
        help=f"recall@10 that nprobe / efSearch are tuned to reach (default {_DEFAULTS.recall_target})",
    )


def index_config(args: argparse.Namespace) -> IndexConfig:
    """The IndexConfig of parsed index options (add_index_options)."""
    return IndexConfig(
        index_type=args.index_type,
        metric=args.metric,
        memory_budget=args.memory_budget,
        seed=args.index_seed,
        recall_target=args.recall_target,
    )
