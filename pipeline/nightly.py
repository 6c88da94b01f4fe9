"""`embedpipe nightly`: one night's work on a run root, published only when valid.

Layout (any Beam filesystem: local, gs://, s3://):
    ROOT/runs/<run-id>/embeddings/  errors/  index/  manifest.json
    ROOT/LATEST        the run id of the newest run that finished AND validated

Order of work: take the root's lock (one nightly run at a time: pipeline/lock.py) ->
embed (reusing the LATEST run's unchanged rows) -> build the index -> validate -> write
the run manifest -> switch LATEST. LATEST is replaced in a single rename, so a reader sees
yesterday's run or today's, never a half-written pointer, and never a run that is still
being written. A run killed at any point leaves LATEST and every earlier run untouched;
the next run starts afresh.

LATEST only moves forward: a run whose id sorts at or before it is refused at the start,
and at publish time, still under the lock, LATEST is read again and replaced only by a
later run id. The root, each run folder and what `--keep` prunes are embedpipe's own
(pipeline/ownership.py): a folder under runs/ is pruned only when its manifest or its
marker names it as that run.

Unchanged image files (same size and mtime as recorded with the LATEST run's row)
are reused without being read; `verify_content` reads and hashes every file instead
(docs/DESIGN-NOTES.md, "Change markers"). The manifest counts them as
`reused_by_marker`, a part of `reused`.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import lock as locks
from pipeline.config import EmbedConfig, IndexConfig
from pipeline.errors import NotPublishedError, UsageError
from pipeline.job import run_embed
from pipeline.ownership import claim, is_embed_output, remove_tree
from pipeline.runs import RUN_ID, embedpipe_runs, new_run_id, read_latest, read_manifest
from pipeline.storage import parquet_files, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


class ValidationError(NotPublishedError):
    """The run is not fit to publish; LATEST stays where it was."""


class RunIdError(UsageError):
    """A run id that is not a plain name, or that does not sort after the published LATEST."""


@dataclasses.dataclass(frozen=True)
class NightlyConfig:
    """Options of `embedpipe nightly` beyond the embedding options."""

    root: str
    embed: EmbedConfig  # its `output` is ignored: the run directory is used
    run_id: str | None = None
    full: bool = False
    keep: int = 0  # 0: keep every run
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)  # what `embedpipe index` would build
    recall_floor: float = 0.9
    workers: int = 1
    require_gpu: bool = False
    # Read and hash every file even when its change marker (size + mtime) is unchanged: for
    # sources whose mtimes can't be trusted (docs/DESIGN-NOTES.md, "Change markers").
    verify_content: bool = False
    overwrite: bool = False  # write into a non-empty root (or run folder) embedpipe did not make
    lock: bool = True  # False: the operator makes sure one run at a time uses the root
    lock_stale_after: float = locks.DEFAULT_STALE_AFTER  # gs:// roots: seconds without a heartbeat
    report: bool = True  # write ROOT/runs/<id>/report.html once the run is published (pipeline/report.py)


def _ids(*directories: str) -> pa.ChunkedArray:
    """Every id of the Parquet files under the directories, as one Arrow column (no Python strings)."""
    chunks = []
    for directory in directories:
        for path in parquet_files(directory):
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                chunks.extend(pq.read_table(handle, columns=["id"]).column("id").chunks)
    return pa.chunked_array(chunks, type=pa.string())


def count_deleted(previous: str, run_dir: str) -> int:
    """Ids of the previous run's embeddings that are neither embedded nor failed tonight."""
    before = _ids(f"{previous}/embeddings")
    if len(before) == 0:
        return 0
    now = _ids(f"{run_dir}/embeddings", f"{run_dir}/errors")
    present = pc.is_in(before, value_set=pc.unique(now) if len(now) else pa.array([], pa.string()))
    return int(len(before) - pc.sum(present).as_py())


def validate(run_dir: str, manifest: dict, index_info: dict, *, fingerprint: str, recall_floor: float) -> None:
    """Every check that must hold before a run is published; raises ValidationError."""
    c = manifest["counts"]
    if c["seen"] is None or c["seen"] != c["embedded"] + c["reused"] + c["failed"]:
        raise ValidationError(f"counts do not add up: {c}")
    if not 0 <= c.get("reused_by_marker", 0) <= c["reused"]:
        raise ValidationError(f"reused_by_marker is not part of reused: {c}")
    rows, dim = 0, manifest["embedding_dim"]  # the model's width (pipeline/applications.py, or a saved model's)
    for path in parquet_files(f"{run_dir}/embeddings"):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            parquet = pq.ParquetFile(handle)
            kind = parquet.schema_arrow.field("embedding").type
            if getattr(kind, "list_size", None) != dim:
                raise ValidationError(f"{path}: embedding type {kind}, expected {dim} float32")
            models = set(pc.unique(parquet.read(columns=["model"]).column("model")).to_pylist())
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
    """Embed, index, validate and publish one run under the root's lock; returns its manifest.

    Raises:
        RunIdError: the run id is not a plain name or does not sort after LATEST.
        NotOwnedError: the root is not empty and embedpipe did not make it (without `overwrite`).
        LockHeldError: another nightly run holds the root's lock.
        ValidationError: the run is not published (failed checks, lost lock, a later run published first).
    """
    start = time.perf_counter()
    # The model's identity, once for the whole night: a weights file is hashed here and nowhere else.
    cfg = dataclasses.replace(cfg, embed=cfg.embed.resolve())
    root = cfg.root.rstrip("/")
    run_id = cfg.run_id or new_run_id()
    if not RUN_ID.fullmatch(run_id):
        raise RunIdError(f"run id {run_id!r} must be a plain name: letters, digits, '.', '_' and '-' (at most 128)")
    claim(root, kind="root", what="--root", overwrite=cfg.overwrite, recognised=lambda r: bool(embedpipe_runs(r)))
    with locks.acquire(root, run_id=run_id, enabled=cfg.lock, stale_after=cfg.lock_stale_after) as held:
        return _run_locked(cfg, beam_args, root, run_id, held, start)


def _run_locked(cfg: NightlyConfig, beam_args, root: str, run_id: str, held, start: float) -> dict:
    from pipeline.index.build import build_index

    run_dir = f"{root}/runs/{run_id}"
    latest = read_latest(root)
    if latest is not None and run_id <= latest:
        raise RunIdError(
            f"run id {run_id} sorts at or before the published LATEST run {latest}, and LATEST only moves forward; "
            "give a later --run-id (or none: the default, the UTC start time, sorts after earlier runs)"
        )
    if run_id in embedpipe_runs(root):
        log.warning("embedpipe nightly: clearing unfinished run %s", run_dir)
        remove_tree(run_dir)
    claim(run_dir, kind="run", what="run folder", overwrite=cfg.overwrite, recognised=is_embed_output, run_id=run_id)

    fingerprint = cfg.embed.model.fingerprint()
    previous_dir = f"{root}/runs/{latest}" if latest else None
    previous = read_manifest(previous_dir) if previous_dir else None
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
        overwrite=cfg.overwrite,
    )
    deleted = 0
    if previous_dir:
        deleted = count_deleted(previous_dir, run_dir)
    manifest["counts"]["deleted"] = deleted
    manifest["counts"].setdefault("reused_by_marker", 0)  # a full run reuses nothing
    if manifest.get("empty_inputs"):
        # A path that holds no image is a typo or a missing mount: publishing would delete the
        # corpus from LATEST. Checked before the index, which an empty run could not even build.
        _refuse(run_dir, run_id, manifest, f"an input holds no image: {'; '.join(manifest['empty_inputs'])}")

    index_info = build_index(run_dir, f"{run_dir}/index", cfg.index)
    try:
        validate(run_dir, manifest, index_info, fingerprint=fingerprint, recall_floor=cfg.recall_floor)
    except ValidationError as exc:
        _refuse(run_dir, run_id, manifest, str(exc))

    manifest.update(
        run_id=run_id,
        mode=mode,
        verify_content=cfg.verify_content,
        previous_run=latest,
        index={
            k: index_info.get(k) for k in ("index_type", "factory", "ntotal", "recall_at_10", "search_params", "bytes")
        },
        validated=True,
    )
    _publish(root, run_id, run_dir, manifest, held, start)
    log.warning("embedpipe nightly: published run %s (LATEST was %s)", run_id, latest)

    if cfg.keep > 0:
        for old in embedpipe_runs(root)[: -cfg.keep]:
            if old != run_id:
                log.warning("embedpipe nightly: pruning run %s (--keep %d)", old, cfg.keep)
                remove_tree(f"{root}/runs/{old}", best_effort=True)  # the night is published: never fail it now
    if cfg.report:
        _write_report(root, run_id)
    return manifest


def _write_report(root: str, run_id: str) -> None:
    """The run's report.html. The run is already published: a report that fails is logged, never fatal."""
    try:
        from pipeline.report import write_run_report

        path, report = write_run_report(root, run_id)
    except Exception as exc:
        log.warning(
            "embedpipe nightly: run %s is published, but its report could not be written (%s: %s); "
            "`embedpipe report --root %s` retries it",
            run_id, type(exc).__name__, exc, root,
        )  # fmt: skip
        return
    for alert in report.alerts:
        log.warning("embedpipe nightly: report: %s", alert)
    log.info("embedpipe nightly: report %s", path)


def _refuse(run_dir: str, run_id: str, manifest: dict, why: str) -> None:
    """Record why the run is not published (its manifest is kept for inspection) and raise ValidationError."""
    manifest.update(run_id=run_id, validated=False, published=False, validation_error=why)
    write_json_atomic(f"{run_dir}/manifest.json", manifest)
    raise ValidationError(why)


def _publish(root: str, run_id: str, run_dir: str, manifest: dict, held, start: float) -> None:
    """Point LATEST at the run, if this run still holds the lock and no later run was published meanwhile."""
    try:
        held.check()
        current = read_latest(root)  # read again: only a later run id may replace it
        if current is not None and current >= run_id:
            raise ValidationError(
                f"run {run_id} is valid but LATEST already names {current}, a later run published meanwhile; "
                "LATEST only moves forward"
            )
    except (locks.LockLostError, ValidationError) as exc:
        manifest.update(published=False, validation_error=str(exc))
        write_json_atomic(f"{run_dir}/manifest.json", manifest)
        raise ValidationError(str(exc)) from exc
    manifest.update(
        published=True,
        published_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        wall_seconds=round(time.perf_counter() - start, 3),
    )
    write_json_atomic(f"{run_dir}/manifest.json", manifest)
    write_text_atomic(f"{root}/LATEST", run_id + "\n")  # the publish: one rename
