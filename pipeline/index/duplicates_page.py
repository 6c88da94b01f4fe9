"""`embedpipe duplicates`: near-duplicate groups of an index as Parquet and as a page of thumbnails.

`render_duplicates_page` turns the Parquet (and the index's stored thumbnails) into one
self-contained HTML page: the server can render it from the file alone, on request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import refuse_unusable_paths
from pipeline.index.duplicates import (
    DEFAULT_NEIGHBOURS,
    DEFAULT_PROBES,
    GROUPS_SCHEMA,
    DuplicateResult,
    find_duplicates,
)
from pipeline.options.indexing import add_index_dir_option
from pipeline.options.runner import use_filesystem_options
from pipeline.storage import write_text_atomic

DEFAULT_MAX_GROUPS = 100  # groups shown on the page (all of them are in the Parquet)
DEFAULT_MAX_MEMBERS = 12  # images shown per group
META_KEY = b"embedpipe.duplicates"  # Parquet metadata: how the groups were found


def write_groups(result: DuplicateResult, path: str) -> None:
    """The groups as Parquet (any Beam filesystem); how they were found goes into the file's metadata."""
    table = result.table.replace_schema_metadata({META_KEY: json.dumps(result.info).encode()})
    tmp = f"{path}.tmp-{time.time_ns()}"
    with FileSystems.create(tmp) as handle:
        pq.write_table(table, handle, row_group_size=65536)
    FileSystems.rename([tmp], [path])  # a reader sees the old file or the new one, never half of one


def read_groups(path: str) -> tuple[pa.Table, dict]:
    """(groups table, info) of a file write_groups wrote."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        table = pq.read_table(handle)
    missing = [name for name in GROUPS_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{path} is not a duplicates file (`embedpipe duplicates --output`): no column(s) {missing}")
    meta = table.schema.metadata or {}
    return table, json.loads(meta[META_KEY]) if META_KEY in meta else {}


def _thumbnails(index_dir: str | None, ids: list[str]) -> dict[str, bytes]:
    """id -> stored thumbnail for the given ids (empty when the index has none or cannot be read)."""
    if not index_dir or not ids:
        return {}
    path = f"{index_dir.rstrip('/')}/ids.parquet"
    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            pf = pq.ParquetFile(handle)
            if "thumbnail" not in pf.schema_arrow.names:
                return {}
            all_ids = pf.read(columns=["id"]).column("id").combine_chunks()
            labels = pc.index_in(pa.array(ids, pa.string()), value_set=all_ids).to_pylist()
            wanted = {label: value for value, label in zip(ids, labels) if label is not None}
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            out: dict[str, bytes] = {}
            for group in sorted({int(np.searchsorted(starts, label, side="right") - 1) for label in wanted}):
                column = pf.read_row_group(group, columns=["thumbnail"]).column(0)
                for label, value in wanted.items():
                    if starts[group] <= label < starts[group + 1]:
                        data = column[label - int(starts[group])].as_py()
                        if data:
                            out[value] = data
            return out
    except (OSError, ValueError):  # a page without thumbnails beats no page
        return {}


def render_duplicates_page(
    groups_path: str,
    index_dir: str | None = None,
    *,
    max_groups: int = DEFAULT_MAX_GROUPS,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> str:
    """The HTML page of a duplicates Parquet file: largest groups first, thumbnails inline.

    Args:
        groups_path: what `embedpipe duplicates --output` wrote (any Beam filesystem).
        index_dir: where the thumbnails are (ids.parquet); default: the index the groups came from.
        max_groups: groups shown (the page says how many more the file holds).
        max_members: images shown per group.
    """
    from pipeline.report_plots import esc, page, threshold_plot, thumbnail_html  # matplotlib: only when rendering

    table, info = read_groups(groups_path)
    index_dir = index_dir or info.get("index_dir")
    group_ids = table.column("group_id").to_numpy()
    starts = np.flatnonzero(np.r_[True, np.diff(group_ids) != 0]) if len(group_ids) else np.zeros(0, dtype=int)
    ends = np.r_[starts[1:], len(group_ids)].astype(int)
    shown = list(zip(starts[:max_groups].tolist(), ends[:max_groups].tolist()))
    ids = table.column("id").to_pylist()
    scores = table.column("score_to_representative").to_pylist()
    uris = table.column("uri").to_pylist()
    reps = table.column("representative").to_pylist()
    wanted = [ids[i] for a, b in shown for i in range(a, min(b, a + max_members))]
    thumbs = _thumbnails(index_dir, wanted)

    sections = []
    for a, b in shown:
        figures = []
        for i in range(a, min(b, a + max_members)):
            role = "representative" if ids[i] == reps[i] else f"cos {scores[i]:.4f}"
            figures.append(
                f'<figure class="member" data-id="{esc(ids[i])}" data-score="{scores[i]:.6f}" title="{esc(uris[i])}">'
                f"{thumbnail_html(thumbs.get(ids[i]), ids[i])}<figcaption><b>{esc(role)}</b><br>{esc(ids[i])}"
                "</figcaption></figure>"
            )
        more = f'<p class="muted">and {b - a - max_members:,} more in the Parquet file</p>' * (b - a > max_members)
        sections.append(
            f'<section class="group" data-group="{int(group_ids[a])}" data-size="{b - a}">'
            f"<h2>Group {int(group_ids[a]) + 1}: {b - a} images</h2>"
            f'<div class="grid">{"".join(figures)}</div>{more}</section>'
        )
    if len(starts) > len(shown):
        sections.append(f'<p class="note">{len(starts) - len(shown):,} smaller groups are in the Parquet file.</p>')
    if not len(starts):
        sections.append('<section class="group-none"><h2>No near-duplicates at this threshold</h2></section>')

    alerts = []
    if info.get("auto") and info.get("auto_clear") is False:
        alerts.append(f'<div class="alert">--auto found no clear gap: {esc(info.get("reason"))}</div>')
    notes = []
    if info.get("lossy_codes"):
        notes.append("The index stores compressed codes: scores are approximate (exact for Flat and IVF-Flat).")
    if info.get("saturated"):
        notes.append(
            f"{info['saturated']:,} images had all {info.get('neighbours')} kept neighbours above the threshold; "
            "their groups are joined through their members."
        )
    histogram = info.get("nn_log10_histogram")
    plot = threshold_plot(histogram["edges"], histogram["counts"], info["threshold"]) if histogram else ""
    summary = (
        f"<section><h2>How the groups were found</h2><p>{int(info.get('ntotal', 0)):,} images; "
        f"{int(info.get('groups', len(starts))):,} groups holding {int(info.get('grouped_images', len(ids))):,} "
        f"images; threshold {esc(info.get('reason', ''))}.</p>"
        f'<p class="muted">Compared: {esc(info.get("method", "?"))}; {info.get("seconds", "?")} s.</p>'
        + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
        + f"{plot}</section>"
    )
    header = (
        f"<h1>Near-duplicate groups</h1><p>index <code>{esc(info.get('index_dir', '?'))}</code> "
        f"({esc(info.get('factory', '?'))}), largest groups first</p>"
    )
    return page("embedpipe duplicates", header, "".join(alerts) + summary + "".join(sections))


def add_duplicates_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `duplicates` subcommand (func=cmd_duplicates) to the `embedpipe` parser."""
    p = subparsers.add_parser(
        "duplicates",
        help="groups of near-duplicate images in an index (Parquet and an HTML page)",
        description="Find groups of near-duplicate images (copies, re-encodes, resizes) in an index directory: "
        "each image's closest neighbours above a cosine threshold, joined into groups. Writes Parquet "
        "(group_id, id, uri, score_to_representative, representative) and optionally an HTML page of the "
        "groups, largest first. docs/DUPLICATES.md explains the threshold and the limits.",
    )
    add_index_dir_option(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=float, metavar="COS", help="cosine similarity at or above which images group")
    how.add_argument(
        "--auto",
        action="store_true",
        help="choose the threshold from the distances of each image to its closest other (the default)",
    )
    p.add_argument("--output", default="groups.parquet", help="Parquet file to write (default groups.parquet)")
    p.add_argument("--html", default=None, metavar="PAGE", help="also write the groups as a self-contained page")
    p.add_argument(
        "--probes",
        type=int,
        default=DEFAULT_PROBES,
        help=f"IVF lists (or cells) each image is compared with, its own included (default {DEFAULT_PROBES})",
    )
    p.add_argument(
        "--neighbours",
        type=int,
        default=DEFAULT_NEIGHBOURS,
        help=f"closest others kept per image (default {DEFAULT_NEIGHBOURS})",
    )
    p.add_argument("--max-groups", type=int, default=DEFAULT_MAX_GROUPS, help="groups shown on the page (default 100)")
    p.set_defaults(func=cmd_duplicates)
    return p


def cmd_duplicates(args: argparse.Namespace, beam_args: list[str]) -> None:
    """Run `embedpipe duplicates`: write the groups (and the page), print what was found."""
    use_filesystem_options(beam_args)  # credentials of remote filesystems
    with refuse_unusable_paths():
        result = find_duplicates(args.index, threshold=args.threshold, probes=args.probes, neighbours=args.neighbours)
        write_groups(result, args.output)
        if args.html:
            write_text_atomic(args.html, render_duplicates_page(args.output, args.index, max_groups=args.max_groups))
    info = result.info
    how = "--auto" if info["auto"] else "--threshold"
    print(f"embedpipe duplicates: {how}: {info['reason']}")
    if info["auto"] and not info["auto_clear"]:
        print("embedpipe duplicates: warning: --auto found no clear gap; check the groups", file=sys.stderr)
    largest = ", ".join(str(s) for s in info["largest_groups"]) or "-"
    print(f"  images    {info['ntotal']:,}")
    print(f"  groups    {info['groups']:,} holding {info['grouped_images']:,} images (largest: {largest})")
    print(f"  compared  {info['method']}")
    print(f"  output    {args.output}" + (f"  page {args.html}" if args.html else ""))
    print(f"  done in   {info['seconds']:.2f}s")
