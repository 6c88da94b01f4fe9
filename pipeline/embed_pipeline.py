"""The Beam pipeline of an embedding job: read -> decode -> embed -> Parquet, its options and batch size.

`build_embed_pipeline` makes the graph (not yet run) that `pipeline.job` runs and `pipeline.plan`
describes for --dry-run. Every image ends as one row: an embedding (made now, or reused from the
previous run) or an error.
"""

from __future__ import annotations

import datetime

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import transport
from pipeline.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, EmbedConfig
from pipeline.decode import DecodeImages
from pipeline.dedup import DedupIds
from pipeline.embed import EmbedImages
from pipeline.progress import Tick
from pipeline.read import ReadImages
from pipeline.records import embeddings_schema
from pipeline.reuse import PreviousKeys, ReuseUnchanged
from pipeline.runner import pipeline_options
from pipeline.topology import InferenceStage, accelerator_hint
from pipeline.write import WriteEmbeddings, WriteErrors


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
    cfg = cfg.resolve()  # the schema's vector width: a saved model's is read from its file
    p = beam.Pipeline(options=options)
    schema = embeddings_schema(cfg.model.dim, thumbnails=cfg.thumbnails, meta=cfg.input.carries_meta())
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
