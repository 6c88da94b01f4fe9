"""The layout of a nightly run root, as every reader of it sees it (nightly, the report, the server).

    ROOT/LATEST                 the id of the newest run that finished and validated
    ROOT/runs/<run-id>/         manifest.json, embeddings/, errors/, index/, report.html

A folder under runs/ is an embedpipe run when its manifest (or its ownership marker) names it
as that run; anything else a user put there is never counted, read or pruned.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re

from apache_beam.io.filesystems import FileSystems

from pipeline.ownership import MARKER_NAME
from pipeline.storage import read_bounded, read_json, read_text

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a single folder name, never a path


def new_run_id(now: datetime.datetime | None = None) -> str:
    """Sortable UTC timestamp, e.g. 20261128T020000Z."""
    return (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def read_latest(root: str) -> str | None:
    """The published run id, or None before the first successful night.

    Raises:
        ValueError: LATEST exists but is unreadable or names no run id (LATEST only moves
            forward, so a run never guesses what it pointed at).
    """
    path = f"{root.rstrip('/')}/LATEST"
    if not FileSystems.exists(path):
        return None
    try:
        text = read_bounded(path, 4096).decode().strip()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); put the published run id in it, or remove it") from exc
    if text and not RUN_ID.fullmatch(text):
        raise ValueError(f"{path} holds {text[:80]!r}, not a run id; put the published run id in it, or remove it")
    return text or None


def latest_run_dir(root: str) -> str | None:
    """ROOT/runs/<LATEST>, the directory readers should use."""
    run = read_latest(root)
    return f"{root.rstrip('/')}/runs/{run}" if run else None


def _names_run(path: str, run_id: str, **expected) -> bool:
    try:
        payload = json.loads(read_text(path) or "null")
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("run_id") == run_id and expected.items() <= payload.items()


def embedpipe_runs(root: str) -> list[str]:
    """Sorted ids of the folders under ROOT/runs/ that are embedpipe runs (manifest or marker names the run)."""
    prefix, ids = f"{root}/runs/", set()
    for name, expected in (("manifest.json", {}), (MARKER_NAME, {"kind": "run"})):
        try:
            found = FileSystems.match([f"{prefix}*/{name}"])[0].metadata_list
        except Exception:  # nothing matched, on filesystems that raise for that
            found = []
        for m in found:
            run = m.path[len(prefix) :].split("/", 1)[0]
            if run not in ids and _names_run(m.path, run, **expected):
                ids.add(run)
    return sorted(ids)


def read_manifest(run_dir: str) -> dict | None:
    """A run's manifest.json, or None (an unfinished run has none)."""
    return _read_json(f"{run_dir}/manifest.json")


@dataclasses.dataclass
class Night:
    """One run folder under ROOT/runs/ and what it says about itself."""

    run_id: str
    run_dir: str
    manifest: dict | None
    index: dict | None  # its index/index.json

    @property
    def counts(self) -> dict:
        """The manifest's counts (empty for an unfinished run)."""
        return (self.manifest or {}).get("counts") or {}

    @property
    def status(self) -> str:
        """published / not published / unfinished."""
        if self.manifest is None:
            return "unfinished"
        return "published" if self.manifest.get("published") else "not published"


def _read_json(path: str) -> dict | None:
    try:
        payload = read_json(path)
    except ValueError:  # not JSON: the run shows as unfinished
        return None
    return payload if isinstance(payload, dict) else None


def load_nights(root: str, *, last: int = 14, newest: str | None = None) -> list[Night]:
    """The last `last` runs under ROOT/runs/ (up to and including `newest`), oldest first.

    Raises:
        ValueError: the root holds no embedpipe run.
    """
    root = root.rstrip("/")
    runs = embedpipe_runs(root)
    if newest is not None:
        runs = [r for r in runs if r <= newest]
    if not runs:
        raise ValueError(
            f"{root} holds no embedpipe run (runs/<run-id>/manifest.json); point --root at the --root of "
            "`embedpipe nightly`"
        )
    nights = []
    for run in runs[-max(1, last) :]:
        run_dir = f"{root}/runs/{run}"
        manifest, index = _read_json(f"{run_dir}/manifest.json"), _read_json(f"{run_dir}/index/index.json")
        nights.append(Night(run, run_dir, manifest, index))
    return nights


def previous_of(night: Night, nights: list[Night]) -> Night | None:
    """The run this one was compared with at embedding time (its previous_run), else the one before it."""
    by_id = {n.run_id: n for n in nights}
    wanted = (night.manifest or {}).get("previous_run")
    if wanted in by_id and by_id[wanted].manifest is not None:
        return by_id[wanted]
    earlier = [n for n in nights if n.run_id < night.run_id and n.manifest is not None]
    return earlier[-1] if earlier else None
