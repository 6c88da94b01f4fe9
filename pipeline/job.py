"""The embedding job: build the Beam pipeline, run it, validate and publish its output.

Output layout (any Beam filesystem):
    OUTPUT/embeddings/part-*.parquet
    OUTPUT/errors/part-*.parquet
    OUTPUT/manifest.json          written last: its presence means the output is whole
    OUTPUT/.embedpipe.json        written first: the folder is embedpipe's
The pipeline writes into OUTPUT/_staging-<time>-<token>/; only after the counts check
out are the files moved into place and the manifest written.

A run deletes only what it writes (pipeline/ownership.py): the Parquet files directly under
embeddings/ and errors/, manifest.json, its own staging folder (kept when the counts do not
add up) and staging folders of killed runs older than a day.
"""

from __future__ import annotations

import logging
import tempfile
import time

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import StandardOptions

from pipeline.config import EmbedConfig
from pipeline.embed_pipeline import build_embed_pipeline, embed_options, resolve_batch_size, utc_now
from pipeline.errors import EmbedpipeError
from pipeline.output_counts import beam_counter, count_rows, count_stamped, error_summary
from pipeline.ownership import claim, is_embed_output, staging_name, sweep_staging
from pipeline.progress import Monitor, metrics_counts, read_channel
from pipeline.progress import channel as progress_dir
from pipeline.runner import runs_locally
from pipeline.storage import remove_tree, replace_parquet_files, write_json_atomic

log = logging.getLogger(__name__)


class CountsMismatchError(EmbedpipeError, RuntimeError):
    """The output does not account for every input image."""


def _manifest(cfg: EmbedConfig, out: str, counts: dict, **fields) -> dict:
    """The manifest of a finished run (everything but the pipeline's own figures comes from cfg)."""
    return {
        "input": cfg.input.to_dict(),
        "output": out,
        "model": cfg.model.fingerprint(),
        "model_config": cfg.model.to_record(),
        "embedding_dim": cfg.model.dim,
        "thumbnails": cfg.thumbnails,
        "counts": counts,
        **fields,
    }


def run_embed(
    cfg: EmbedConfig,
    beam_args: list[str] | None = None,
    *,
    workers: int = 1,
    require_gpu: bool = False,
    previous_files: list[str] | None = None,
    verify_content: bool = False,
    preflight: bool = True,
    overwrite: bool = False,
) -> dict:
    """Run the embedding job to completion and return its manifest (also written to OUTPUT).

    Args:
        cfg: what to embed, where to, with which model.
        beam_args: Beam pipeline options, passed through unchanged.
        workers: local worker processes (local runners only).
        require_gpu: workers fail at start-up without a GPU.
        previous_files: embeddings files of a previous run by the same model, to reuse.
        verify_content: read and hash every file even where its change marker is unchanged.
        preflight: check the weights in the driver before starting (local runners).
        overwrite: write into a non-empty OUTPUT that embedpipe did not write (else NotOwnedError).

    Raises:
        WeightsUnavailableError: the weights cannot be had (checked before anything is written).
        NotOwnedError: OUTPUT is not empty and embedpipe did not write it (without `overwrite`).
        CountsMismatchError: rows went missing; nothing is published.
    """
    # The model's identity, once for the run: a weights file is hashed here and the digest goes to every worker.
    cfg = cfg.resolve()
    out = cfg.output.rstrip("/")
    options, accelerator = embed_options(cfg, list(beam_args or []), workers=workers)
    if preflight and runs_locally(options):
        # Local workers share this machine's Keras cache: fetch (or fail) once, up front.
        from pipeline.model import ensure_weights_available

        ensure_weights_available(cfg.model)
    if cfg.decode == "gpu" and runs_locally(options):
        from pipeline.decode import gpu_decoding

        gpu_decoding("gpu")  # the workers are this machine: say now, in one line, if it cannot
    claim(
        out, kind="output", what="--output", overwrite=overwrite, accepts=("output", "run"), recognised=is_embed_output
    )
    sweep_staging(out)
    embedded_at = utc_now()
    staging = f"{out}/{staging_name(embedded_at)}"
    try:
        manifest = _run_and_count(
            cfg,
            options,
            staging,
            embedded_at,
            workers=workers,
            require_gpu=require_gpu,
            previous_files=previous_files,
            verify_content=verify_content,
            accelerator=accelerator,
        )
        if FileSystems.exists(f"{out}/manifest.json"):
            FileSystems.delete([f"{out}/manifest.json"])  # the output is in flux until it is back
        replace_parquet_files(f"{staging}/embeddings", f"{out}/embeddings")
        replace_parquet_files(f"{staging}/errors", f"{out}/errors")
    except CountsMismatchError:
        raise  # its staged output is kept for inspection, and the message says where
    except BaseException:
        try:
            remove_tree(staging)
        except Exception as exc:  # the original failure matters more; the next run sweeps it
            log.warning("embedpipe: could not remove %s: %s", staging, exc)
        raise
    remove_tree(staging)
    write_json_atomic(f"{out}/manifest.json", manifest)
    return manifest


def _run_and_count(
    cfg, options, staging, embedded_at, *, workers, require_gpu, previous_files, verify_content, accelerator
) -> dict:
    """Run the pipeline into `staging` and return the manifest; CountsMismatchError if rows go missing."""
    out = cfg.output.rstrip("/")
    start = time.perf_counter()
    local = runs_locally(options)
    with progress_dir(tempfile.gettempdir() if local else None) as channel:
        p = build_embed_pipeline(
            cfg,
            options,
            embeddings_dir=f"{staging}/embeddings",
            errors_dir=f"{staging}/errors",
            embedded_at=embedded_at,
            require_gpu=require_gpu,
            previous_files=previous_files,
            verify_content=verify_content,
            accelerator=accelerator,
            progress_channel=channel,
        )
        log.info("embedpipe: running on %s (%d worker process(es))", options.view_as(StandardOptions).runner, workers)
        if local:  # FnApiRunner runs the whole pipeline inside run(): the monitor watches the channel meanwhile
            with Monitor(lambda: read_channel(channel), every=cfg.progress_seconds):
                result = p.run()
                result.wait_until_finish()
        else:  # a remote job: run() returns at once, its metrics say how far it is while we wait
            result = p.run()
            with Monitor(lambda: metrics_counts(result), every=cfg.progress_seconds):
                result.wait_until_finish()
    wall = time.perf_counter() - start

    rows = count_rows(f"{staging}/embeddings")
    by_reason, empty_inputs = error_summary(f"{staging}/errors")
    failed = sum(by_reason.values())
    # Beam reports no counter at all when nothing incremented it: nothing was read.
    seen = beam_counter(result, "images_seen") or 0
    # Counted from the output, not from the reuse counter: a reused id read twice is carried
    # twice and one copy becomes a duplicate_id error, so only the rows written are reused.
    embedded = count_stamped(f"{staging}/embeddings", embedded_at)
    reused = rows - embedded
    counts = {"seen": seen, "embedded": embedded, "reused": reused, "failed": failed}
    if previous_files is not None:
        # Of the reused images, how many were not even read (change marker unchanged).
        counts["reused_by_marker"] = min(reused, beam_counter(result, "images_reused_by_marker") or 0)
    if seen != embedded + reused + failed:
        raise CountsMismatchError(
            f"counts do not add up: seen {seen} != embedded {embedded} + reused {reused} + failed {failed}; "
            f"staged output left at {staging} for inspection, nothing published"
        )
    return _manifest(
        cfg,
        out,
        counts,
        batch_size=resolve_batch_size(cfg, options, require_gpu=require_gpu or bool(accelerator)),
        decode_stage=cfg.decode_stage,
        accelerator_hint=accelerator,
        embedded_at=embedded_at.isoformat(),
        failed_by_reason=by_reason,
        # Input paths that held no image at all (what each held instead): `embed` exits 2 and
        # `nightly` refuses to publish, since a path typed wrong must never look like success.
        empty_inputs=empty_inputs,
        model_loads=beam_counter(result, "model_loads"),
        runner=options.view_as(StandardOptions).runner,
        workers=workers,
        wall_seconds=round(wall, 3),
        images_per_second=round(embedded / wall, 3) if wall > 0 else None,
    )
