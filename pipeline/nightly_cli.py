"""`embedpipe nightly`: its parser (the embedding and index groups plus the run root's own options) and summary."""

from __future__ import annotations

import argparse
import dataclasses

from pipeline.embed_cli import print_plan, print_summary
from pipeline.lock import DEFAULT_STALE_AFTER
from pipeline.options.embedding import add_embedding_options, embed_config
from pipeline.options.indexing import add_index_options, index_config


def add_nightly_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `nightly` subcommand (func=cmd_nightly) to the `embedpipe` parser."""
    p = subparsers.add_parser(
        "nightly",
        help="one night's incremental re-embedding + index, published atomically under --root",
        description="Embed --input into ROOT/runs/<run-id>/, reusing the LATEST run's embeddings of unchanged "
        "images (same id, same sha256, same model; plain files whose size and mtime are unchanged are not even "
        "read), build the index, validate, and only then point ROOT/LATEST "
        "at the new run. One run at a time per root (ROOT/nightly.lock). Exit 3 when the run is not published "
        "(validation failed, or a later run published first: LATEST unchanged), 4 when another run holds the "
        "lock. Other options go to Beam.",
    )
    add_embedding_options(p)
    n = p.add_argument_group("nightly")
    n.add_argument("--root", required=True, help="run root (local, gs://, s3://): runs/<run-id>/ and LATEST")
    n.add_argument("--run-id", default=None, help="run id (default: UTC timestamp, e.g. 20261128T020000Z)")
    n.add_argument("--full", action="store_true", help="re-embed everything, reuse nothing")
    n.add_argument(
        "--verify-content",
        action="store_true",
        help="read and hash every file even when its size and mtime are unchanged (default: trust those change "
        "markers and skip reading unchanged files; docs/DESIGN-NOTES.md, 'Change markers')",
    )
    n.add_argument(
        "--keep",
        type=int,
        default=0,
        help="after publishing, keep only the newest N runs (0: keep all); only folders that are embedpipe runs "
        "are counted and pruned",
    )
    n.add_argument(
        "--overwrite",
        action="store_true",
        help="use a non-empty --root that embedpipe did not create (default: refuse)",
    )
    n.add_argument(
        "--no-lock",
        action="store_true",
        help="do not take ROOT/nightly.lock (needed on roots other than local and gs://); you then make sure "
        "only one nightly run uses the root at a time",
    )
    n.add_argument(
        "--lock-stale-after",
        type=float,
        default=DEFAULT_STALE_AFTER,
        metavar="SECONDS",
        help="gs:// roots: a lock whose heartbeat is older than this belongs to a dead run and is broken "
        f"(default {DEFAULT_STALE_AFTER:g}: {DEFAULT_STALE_AFTER / 3600:g} h; the holder rewrites it every 5 min)",
    )
    n.add_argument(
        "--recall-floor", type=float, default=0.9, help="refuse to publish an index below this recall@10 (default 0.9)"
    )
    n.add_argument(
        "--no-report",
        action="store_true",
        help="do not write runs/<run-id>/report.html after publishing (default: write it; docs/REPORT.md)",
    )
    add_index_options(p)
    p.set_defaults(func=cmd_nightly)
    return p


def cmd_nightly(args: argparse.Namespace, beam_args: list[str]) -> None:
    """Run `embedpipe nightly` and print its summary; raises what run_nightly raises (not published, lock held)."""
    from pipeline.nightly import NightlyConfig, run_nightly

    cfg = NightlyConfig(
        root=args.root,
        embed=embed_config(args),
        run_id=args.run_id,
        full=args.full,
        keep=args.keep,
        index=index_config(args),
        recall_floor=args.recall_floor,
        workers=args.workers,
        require_gpu=args.require_gpu,
        verify_content=args.verify_content,
        overwrite=args.overwrite,
        lock=not args.no_lock,
        lock_stale_after=args.lock_stale_after,
        report=not args.no_report,
    )
    if args.dry_run:
        from pipeline.plan import plan_embed

        embed_cfg = dataclasses.replace(cfg.embed, output=f"{args.root.rstrip('/')}/runs/<run-id>")
        print_plan(plan_embed(embed_cfg, beam_args, workers=args.workers, require_gpu=args.require_gpu))
        return
    manifest = run_nightly(cfg, beam_args)
    print_summary(manifest)
    c = manifest["counts"]
    print(f"  deleted   {c['deleted']}")
    print(
        f"  index     {manifest['index']['index_type']} ntotal={manifest['index']['ntotal']} "
        f"recall@10={manifest['index']['recall_at_10']}"
    )
    print(f"  published {args.root.rstrip('/')}/runs/{manifest['run_id']} (LATEST)")
