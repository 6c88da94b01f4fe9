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

import collections
import dataclasses
import datetime
import logging
import tempfile
import time

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline import reasons, transport
from pipeline.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, EmbedConfig
from pipeline.decode import DecodeImages
from pipeline.dedup import DedupIds
from pipeline.embed import EmbedImages
from pipeline.ownership import claim, is_embed_output, staging_name, sweep_staging
from pipeline.progress import Monitor, Tick, metrics_counts, read_channel
from pipeline.progress import channel as progress_dir
from pipeline.read import ReadImages
from pipeline.records import embeddings_schema
from pipeline.reuse import PreviousKeys, ReuseUnchanged
from pipeline.runner import LOCAL_RUNNER, pipeline_options, runs_locally
from pipeline.storage import parquet_files, remove_tree, replace_parquet_files, write_json_atomic
from pipeline.topology import InferenceStage, accelerator_hint, hints_of
from pipeline.write import WriteEmbeddings, WriteErrors

log = logging.getLogger(__name__)


class CountsMismatchError(RuntimeError):
    """The output does not account for every input image."""


def embed_options(cfg: EmbedConfig, beam_args: list[str], *, workers: int) -> tuple[PipelineOptions, str | None]:
    """(pipeline options, the inference stage's accelerator hint or None) of an embedding job.

    In the separate layout the job's GPU request leaves the pipeline-wide options and becomes
    the hint (pipeline/topology.py); the options remember that GPUs are wanted (batch size).
    """
    options = pipeline_options(list(beam_args), workers=workers)
    if cfg.decode_stage != "separate":
        return options, None
    return options, accelerator_hint(options, decode_machine_type=cfg.decode_machine_type)


def resolve_batch_size(cfg: EmbedConfig, options: PipelineOptions, *, require_gpu: bool = False) -> int:
    """The batch size: as given, or the device default (GPU when the job asks for accelerators)."""
    if cfg.batch_size:
        return cfg.batch_size
    services = options.get_all_options().get("dataflow_service_options") or []
    wants_gpu = require_gpu or any("worker_accelerator" in str(s) for s in services)
    return GPU_BATCH_SIZE if wants_gpu else CPU_BATCH_SIZE


def utc_now() -> datetime.datetime:
    """The run's timestamp (microseconds, UTC): one value stamped on every row of a run."""
    return datetime.datetime.now(datetime.timezone.utc)


def build_embed_pipeline(
    cfg: EmbedConfig,
    options: PipelineOptions,
    *,
    embeddings_dir: str,
    errors_dir: str,
    embedded_at: datetime.datetime,
    require_gpu: bool = False,
    previous_files: list[str] | None = None,
    verify_content: bool = False,
    accelerator: str | None = None,
    progress_channel: str | None = None,
) -> beam.Pipeline:
    """The pipeline (not yet run): read -> decode -> embed -> Parquet, with every error kept.

    With `cfg.decode_stage == "separate"`, decoded pixels cross a shuffle to an inference
    stage, which alone carries the `accelerator` resource hint (pipeline/topology.py).

    With `previous_files` (a previous run's embeddings made by the same model),
    unchanged images reuse their rows instead of being decoded and embedded. Files
    whose change marker (size + mtime) is the previous row's are not even read,
    unless `verify_content`, which reads and hashes every file (markers are still
    recorded, for nights that trust them).
    """
    p = beam.Pipeline(options=options)
    schema = embeddings_schema(thumbnails=cfg.thumbnails, meta=cfg.input.carries_meta())
    previous = None
    if previous_files is not None:
        previous = p | "PreviousKeys" >> PreviousKeys(previous_files)
    markers = previous["markers"] if previous is not None and not verify_content else None
    read = p | "ReadImages" >> ReadImages(
        cfg.input, max_bytes=cfg.max_bytes, previous_markers=markers, progress=progress_channel
    )
    images, reused = read["images"] | "CountSeen" >> Tick("seen", progress_channel), None
    if previous is not None:
        split = images | "ReuseUnchanged" >> ReuseUnchanged(
            previous_files, schema.names, previous_shas=previous["shas"], unchanged=read.get("unchanged")
        )
        images, reused = split["changed"], split["reused"]
    decoded = images | "DecodeImages" >> DecodeImages(
        size=cfg.model.image_size,
        resize=cfg.model.resize,
        max_pixels=cfg.max_pixels,
        draft=cfg.draft,
        thumbnails=cfg.thumbnails,
        threads=cfg.decode_threads,
        # Separate: decoding runs on the CPU workers, and the pixels must be host arrays to cross the shuffle.
        decode="cpu" if cfg.decode_stage == "separate" else cfg.decode,
        batch_size=resolve_batch_size(cfg, options, require_gpu=require_gpu or bool(accelerator)),
    )
    embed = EmbedImages(
        cfg.model,
        batch_size=resolve_batch_size(cfg, options, require_gpu=require_gpu or bool(accelerator)),
        embedded_at=embedded_at,
        intra_op_threads=cfg.intra_op_threads,
        require_gpu=require_gpu,
    )
    if cfg.decode_stage == "separate":
        shuffled = (
            decoded.decoded
            | "EncodePixels" >> beam.Map(transport.encode)
            | "ToInference" >> beam.Reshuffle()  # the fusion break: decode workers | inference workers
        )
        stage = InferenceStage(embed)
        if accelerator:
            stage = stage.with_resource_hints(accelerator=accelerator)
        embedded = shuffled | "EmbedImages" >> stage
    else:
        embedded = decoded.decoded | "EmbedImages" >> embed
    rows = embedded.embeddings
    if reused is not None:
        rows = (rows, reused) | "WithReused" >> beam.Flatten()
    errors = (read["errors"], decoded.errors, embedded.errors) | "AllErrors" >> beam.Flatten()
    # Every image ends as one of these rows: counted as done as it is made (before any grouping).
    rows = rows | "CountDone" >> Tick("done", progress_channel)
    errors = errors | "CountFailed" >> Tick("done", progress_channel)
    if cfg.input.ids_may_repeat():
        # Every image ends as exactly one row (embedded or error), so grouping the
        # small rows by id sees every copy; image bytes are never shuffled.
        kept = (rows, errors) | "DedupIds" >> DedupIds()
        rows, errors = kept["embeddings"], kept["errors"]
    _ = rows | "WriteEmbeddings" >> WriteEmbeddings(embeddings_dir, schema)
    _ = errors | "WriteErrors" >> WriteErrors(errors_dir)
    return p


def describe_pipeline(p: beam.Pipeline) -> list[str]:
    """The transform graph as indented labels (what Dataflow would show), without running it."""
    from apache_beam.pipeline import PipelineVisitor

    lines: list[str] = []

    class _Visitor(PipelineVisitor):
        def enter_composite_transform(self, node):
            if node.full_label:
                lines.append("  " * node.full_label.count("/") + node.full_label.rsplit("/", 1)[-1])

        def visit_transform(self, node):
            lines.append("  " * node.full_label.count("/") + node.full_label.rsplit("/", 1)[-1])

        def leave_composite_transform(self, node):
            # Hints are shown once, on the composite that carries them (its steps inherit them).
            hints = hints_of(node)
            own = hints and hints != hints_of(node.parent) if node.parent is not None else hints
            if own and lines:
                label = "  " * node.full_label.count("/") + node.full_label.rsplit("/", 1)[-1]
                at = max(i for i, line in enumerate(lines) if line == label)
                lines[at] += "  [" + ", ".join(f"{k}={v}" for k, v in sorted(hints.items())) + "]"

    p.visit(_Visitor())
    return lines


def plan_embed(
    cfg: EmbedConfig, beam_args: list[str] | None = None, *, workers: int = 1, require_gpu: bool = False
) -> dict:
    """Resolve options and build (not run) the pipeline: what `--dry-run` prints."""
    options, accelerator = embed_options(cfg, list(beam_args or []), workers=workers)
    # The graph is built under the local runner: constructing a pipeline for
    # Dataflow would validate against (and call) Google Cloud.
    graph_options = PipelineOptions.from_dictionary(options.get_all_options(drop_default=True))
    graph_options.view_as(StandardOptions).runner = LOCAL_RUNNER
    p = build_embed_pipeline(
        cfg,
        graph_options,
        embeddings_dir=f"{cfg.output.rstrip('/')}/embeddings",
        errors_dir=f"{cfg.output.rstrip('/')}/errors",
        embedded_at=utc_now(),
        require_gpu=require_gpu,
        accelerator=accelerator,
    )
    return {
        "batch_size": resolve_batch_size(cfg, options, require_gpu=require_gpu or bool(accelerator)),
        "accelerator_hint": accelerator,
        "pipeline_options": options.get_all_options(drop_default=True),
        "model": cfg.model.fingerprint(),
        "embed_config": {
            **dataclasses.asdict(cfg),
            "input": cfg.input.to_dict(),
        },
        "transforms": describe_pipeline(p),
    }


def count_rows(directory: str) -> int:
    """Rows in all Parquet files of a directory, from the footers only."""
    total = 0
    for path in parquet_files(directory):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def count_stamped(directory: str, embedded_at: datetime.datetime) -> int:
    """Rows in a run's embeddings stamped with this run's `embedded_at` (embedded, not reused)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for path in parquet_files(directory):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            column = pq.read_table(handle, columns=["embedded_at"]).column("embedded_at")
        total += pc.sum(pc.equal(column, pa.scalar(embedded_at, type=column.type))).as_py() or 0
    return total


def error_reasons(directory: str) -> dict[str, int]:
    """error code -> count over errors/*.parquet."""
    return error_summary(directory)[0]


def error_summary(directory: str, *, max_empty: int = 20) -> tuple[dict[str, int], list[str]]:
    """(error code -> count, the messages of up to `max_empty` empty_input rows) over errors/*.parquet."""
    counts: collections.Counter = collections.Counter()
    empty: list[str] = []
    for path in parquet_files(directory):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            table = pq.read_table(handle, columns=["error", "message"])
        codes = table.column("error").to_pylist()
        counts.update(codes)
        if reasons.EMPTY_INPUT in counts and len(empty) < max_empty:
            messages = table.column("message").to_pylist()
            empty += [m for c, m in zip(codes, messages) if c == reasons.EMPTY_INPUT][: max_empty - len(empty)]
    return dict(sorted(counts.items())), sorted(empty)


def _counter(result, name: str) -> int | None:
    found = result.metrics().query(MetricsFilter().with_namespace("embedpipe").with_name(name))["counters"]
    if not found:
        return None
    values = [c.committed if c.committed is not None else c.attempted for c in found]
    return int(sum(v for v in values if v is not None))


def _manifest(cfg: EmbedConfig, out: str, counts: dict, **fields) -> dict:
    """The manifest of a finished run (everything but the pipeline's own figures comes from cfg)."""
    return {
        "input": cfg.input.to_dict(),
        "output": out,
        "model": cfg.model.fingerprint(),
        "model_config": {
            "image_size": cfg.model.image_size,
            "pooling": cfg.model.pooling,
            "weights": cfg.model.weights,
            "seed": cfg.model.seed,
            "resize": cfg.model.resize,
            "precision": cfg.model.precision,
        },
        "embedding_dim": 2048,
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
    """
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
    seen = _counter(result, "images_seen") or 0
    # Counted from the output, not from the reuse counter: a reused id read twice is carried
    # twice and one copy becomes a duplicate_id error, so only the rows written are reused.
    embedded = count_stamped(f"{staging}/embeddings", embedded_at)
    reused = rows - embedded
    counts = {"seen": seen, "embedded": embedded, "reused": reused, "failed": failed}
    if previous_files is not None:
        # Of the reused images, how many were not even read (change marker unchanged).
        counts["reused_by_marker"] = min(reused, _counter(result, "images_reused_by_marker") or 0)
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
        model_loads=_counter(result, "model_loads"),
        runner=options.view_as(StandardOptions).runner,
        workers=workers,
        wall_seconds=round(wall, 3),
        images_per_second=round(embedded / wall, 3) if wall > 0 else None,
    )
