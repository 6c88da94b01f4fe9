"""`embedpipe nightly`: one night's work on a run root, published only when valid.

Layout (any Beam filesystem: local, gs://, s3://):
    ROOT/runs/<run-id>/embeddings/  errors/  index/  manifest.json
    ROOT/LATEST        the run id of the newest run that finished AND validated

Order of work: embed (reusing the LATEST run's unchanged rows) -> build the index
-> validate -> write the run manifest -> switch LATEST. LATEST is replaced in a
single rename, so a reader sees yesterday's run or today's, never a half-written
pointer, and never a run that is still being written. A run killed at any point
leaves LATEST and every earlier run untouched; the next run starts afresh.

Unchanged image files (same size and mtime as recorded with the LATEST run's row)
are reused without being read; `verify_content` reads and hashes every file instead
(docs/DESIGN-NOTES.md, "Change markers"). The manifest counts them as
`reused_by_marker`, a part of `reused`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.config import EMBEDDING_DIM, EmbedConfig
from pipeline.job import parquet_files, run_embed, write_json_atomic

log = logging.getLogger(__name__)


class ValidationError(RuntimeError):
    """The run is not fit to publish; LATEST stays where it was."""


@dataclasses.dataclass(frozen=True)
class NightlyConfig:
    """Options of `embedpipe nightly` beyond the embedding options."""

    root: str
    embed: EmbedConfig  # its `output` is ignored: the run directory is used
    run_id: str | None = None
    full: bool = False
    keep: int = 0  # 0: keep every run
    index: str = "auto"
    metric: str = "cosine"
    memory_budget: str = "4GB"
    recall_floor: float = 0.9
    workers: int = 1
    require_gpu: bool = False
    # Read and hash every file even when its change marker (size + mtime) is unchanged: for
    # sources whose mtimes can't be trusted (docs/DESIGN-NOTES.md, "Change markers").
    verify_content: bool = False


def new_run_id(now: datetime.datetime | None = None) -> str:
    """Sortable UTC timestamp, e.g. 20261128T020000Z."""
    return (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def _read_text(path: str) -> str | None:
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            return f.read().decode().strip()
    except Exception:  # missing: no run published yet
        return None


def read_latest(root: str) -> str | None:
    """The published run id, or None before the first successful night."""
    return _read_text(f"{root.rstrip('/')}/LATEST") or None


def latest_run_dir(root: str) -> str | None:
    """ROOT/runs/<LATEST>, the directory readers should use."""
    run = read_latest(root)
    return f"{root.rstrip('/')}/runs/{run}" if run else None


def _read_manifest(run_dir: str) -> dict | None:
    text = _read_text(f"{run_dir}/manifest.json")
    return json.loads(text) if text else None


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{time.time_ns()}"
    with FileSystems.create(tmp) as out:
        out.write(text.encode())
    FileSystems.rename([tmp], [path])


def _ids(directory: str) -> set[str]:
    ids: set[str] = set()
    for path in parquet_files(directory):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            ids.update(pq.read_table(handle, columns=["id"]).column("id").to_pylist())
    return ids


def _run_ids(root: str) -> list[str]:
    try:
        found = FileSystems.match([f"{root}/runs/**"])[0].metadata_list
    except Exception:
        return []
    prefix = f"{root}/runs/"
    return sorted({m.path[len(prefix) :].split("/", 1)[0] for m in found if m.path.startswith(prefix)})


def _delete_run(root: str, run_id: str) -> None:
    path = f"{root}/runs/{run_id}"
    FileSystems.delete([path if "://" not in path else path + "/"])


def validate(run_dir: str, manifest: dict, index_info: dict, *, fingerprint: str, recall_floor: float) -> None:
    """Every check that must hold before a run is published; raises ValidationError."""
    c = manifest["counts"]
    if c["seen"] is None or c["seen"] != c["embedded"] + c["reused"] + c["failed"]:
        raise ValidationError(f"counts do not add up: {c}")
    if not 0 <= c.get("reused_by_marker", 0) <= c["reused"]:
        raise ValidationError(f"reused_by_marker is not part of reused: {c}")
    rows = 0
    for path in parquet_files(f"{run_dir}/embeddings"):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            parquet = pq.ParquetFile(handle)
            kind = parquet.schema_arrow.field("embedding").type
            if getattr(kind, "list_size", None) != EMBEDDING_DIM:
                raise ValidationError(f"{path}: embedding type {kind}, expected {EMBEDDING_DIM} float32")
            models = set(parquet.read(columns=["model"]).column("model").to_pylist())
            if models - {fingerprint}:
                raise ValidationError(f"{path}: rows of another model {sorted(models - {fingerprint})}")
            rows += parquet.metadata.num_rows
    if rows != c["embedded"] + c["reused"]:
        raise ValidationError(f"{rows} embedding rows, manifest says {c['embedded']} + {c['reused']}")
    if index_info["ntotal"] != rows:
        raise ValidationError(f"index holds {index_info['ntotal']} vectors, embeddings have {rows}")
    if index_info.get("model") != fingerprint:
        raise ValidationError(f"index model {index_info.get('model')} != {fingerprint}")
    recall = index_info.get("recall_at_10")
    if recall is None or recall < recall_floor:
        raise ValidationError(f"index recall@10 {recall} is below the floor {recall_floor} (--recall-floor)")


def run_nightly(cfg: NightlyConfig, beam_args: list[str] | None = None) -> dict:
    """Embed, index, validate and publish one run; returns its manifest."""
    from pipeline.index.build import build_index

    start = time.perf_counter()
    root = cfg.root.rstrip("/")
    run_id = cfg.run_id or new_run_id()
    run_dir = f"{root}/runs/{run_id}"
    latest = read_latest(root)
    if run_id == latest:
        raise ValidationError(f"run {run_id} is the published LATEST run; choose another --run-id")
    if FileSystems.exists(f"{run_dir}/manifest.json") or FileSystems.exists(f"{run_dir}/embeddings"):
        log.warning("embedpipe nightly: clearing unfinished run %s", run_dir)
        _delete_run(root, run_id)

    fingerprint = cfg.embed.model.fingerprint()
    previous_dir = f"{root}/runs/{latest}" if latest else None
    previous = _read_manifest(previous_dir) if previous_dir else None
    previous_files = None
    mode = "full"
    if cfg.full:
        log.warning("embedpipe nightly: --full: re-embedding everything")
    elif previous is None:
        log.warning("embedpipe nightly: no published run under %s: embedding everything", root)
    elif previous.get("model") != fingerprint:
        log.warning(
            "embedpipe nightly: model changed (%s -> %s): re-embedding everything", previous.get("model"), fingerprint
        )
    else:
        previous_files = parquet_files(f"{previous_dir}/embeddings")
        mode = "incremental"

    beam_args = list(beam_args or [])
    if not any(a == "--job_name" or a.startswith("--job_name=") for a in beam_args):
        # A readable Dataflow job name per night (Beam's default is beamapp-<user>-<time>).
        beam_args.append(f"--job_name=embedpipe-nightly-{run_id.lower().replace('_', '-')}")
    embed_cfg = dataclasses.replace(cfg.embed, output=run_dir)
    manifest = run_embed(
        embed_cfg,
        beam_args,
        workers=cfg.workers,
        require_gpu=cfg.require_gpu,
        previous_files=previous_files,
        verify_content=cfg.verify_content,
        preflight=False,  # a night with nothing to embed must not import TensorFlow
    )
    deleted = 0
    if previous_dir:
        now = _ids(f"{run_dir}/embeddings") | _ids(f"{run_dir}/errors")
        deleted = len(_ids(f"{previous_dir}/embeddings") - now)
    manifest["counts"]["deleted"] = deleted
    manifest["counts"].setdefault("reused_by_marker", 0)  # a full run reuses nothing

    index_info = build_index(
        run_dir, f"{run_dir}/index", index=cfg.index, metric=cfg.metric, memory_budget=cfg.memory_budget
    )
    try:
        validate(run_dir, manifest, index_info, fingerprint=fingerprint, recall_floor=cfg.recall_floor)
    except ValidationError as exc:
        manifest.update(run_id=run_id, validated=False, validation_error=str(exc))
        write_json_atomic(f"{run_dir}/manifest.json", manifest)  # kept for inspection, never published
        raise

    manifest.update(
        run_id=run_id,
        mode=mode,
        verify_content=cfg.verify_content,
        previous_run=latest,
        index={
            k: index_info.get(k) for k in ("index_type", "factory", "ntotal", "recall_at_10", "search_params", "bytes")
        },
        validated=True,
        published_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        wall_seconds=round(time.perf_counter() - start, 3),
    )
    write_json_atomic(f"{run_dir}/manifest.json", manifest)
    _write_text_atomic(f"{root}/LATEST", run_id + "\n")  # the publish: one rename
    log.warning("embedpipe nightly: published run %s (LATEST was %s)", run_id, latest)

    if cfg.keep > 0:
        for old in _run_ids(root)[: -cfg.keep]:
            if old != run_id:
                log.warning("embedpipe nightly: pruning run %s (--keep %d)", old, cfg.keep)
                _delete_run(root, old)
    return manifest
