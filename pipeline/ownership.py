"""Which folders embedpipe may write into, and what it may delete there.

A folder that embedpipe writes into carries `.embedpipe.json`, written before anything
else, naming its kind: an embed `output`, a nightly `root`, or one nightly `run`. A
non-empty folder without it (and without the manifest of an earlier embedpipe version) is
refused unless the caller passes `overwrite`: embedpipe replaces only files it writes,
and only in its own folders (docs/DESIGN-NOTES.md, "Ownership of outputs").

Staging folders (`OUTPUT/_staging-<UTC start>-<token>/`) are embedpipe's by their name:
a run removes its own when it fails, and the next run into the same output removes those
of killed runs once they are a day old (younger ones may belong to a run still going).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable

from apache_beam.io.filesystems import FileSystems

from pipeline.errors import UsageError
from pipeline.storage import is_local, read_bounded, remove_tree, safe_text, write_json_atomic

log = logging.getLogger(__name__)

MARKER_NAME = ".embedpipe.json"
STAGING_MAX_AGE = 24 * 3600.0  # younger staging folders may belong to a run still going
_STAGING = re.compile(r"_staging-(?:(\d{8}T\d{6}Z)-)?[0-9a-f]{12}")
_STAMP = "%Y%m%dT%H%M%SZ"


_KINDS = {"output": "an embed output", "root": "a nightly run root", "run": "a nightly run"}


class NotOwnedError(UsageError):
    """A folder that embedpipe did not write is not empty: nothing is written into it."""


def read_marker(folder: str) -> dict | None:
    """The content of FOLDER/.embedpipe.json, or None when there is none (or it is not ours)."""
    try:  # regular files only, bounded: a FIFO or a huge file of that name is simply not a marker
        marker = json.loads(read_bounded(f"{folder.rstrip('/')}/{MARKER_NAME}", 65536))
    except Exception:  # missing or unreadable: not a marker
        return None
    return marker if isinstance(marker, dict) and marker.get("embedpipe") else None


def entries(folder: str, limit: int = 4) -> list[str]:
    """Up to `limit` names found under a folder ([] for a missing or empty one)."""
    folder = folder.rstrip("/")
    if is_local(folder):
        if not os.path.exists(folder):
            return []
        if not os.path.isdir(folder):
            raise NotOwnedError(f"{safe_text(folder)} is a file, not a folder; choose a folder")
        names = sorted(os.listdir(folder))
    else:
        try:
            found = FileSystems.match([f"{folder}/**"], limits=[limit + 2])[0].metadata_list
        except Exception:  # some filesystems raise when nothing matches
            found = []
        names = [m.path[len(folder) + 1 :] for m in found]
    # The marker of a claim under way (its temp file) does not make a folder someone else's.
    return [safe_text(n) for n in names if not n.startswith(MARKER_NAME)][:limit]


def claim(
    folder: str,
    *,
    kind: str,
    what: str,
    overwrite: bool = False,
    accepts: tuple[str, ...] = (),
    recognised: Callable[[str], bool] | None = None,
    **fields,
) -> None:
    """Make sure embedpipe may write into `folder`, and mark it as embedpipe's.

    A folder is embedpipe's when it is empty or new, carries a marker of a kind in
    `accepts` (default: `kind`), or `recognised(folder)` says so (outputs of versions
    that wrote no marker). Anything else raises NotOwnedError, unless `overwrite`.
    `what` names the folder in the message (e.g. "--output").
    """
    folder = folder.rstrip("/")
    marker = read_marker(folder)
    if marker is not None and marker.get("kind") in (accepts or (kind,)):
        return
    found = entries(folder, limit=5)
    if found and not (marker is None and recognised is not None and recognised(folder)):
        if marker:
            why = f"{_KINDS.get(marker.get('kind'), 'another embedpipe folder')}, not {_KINDS[kind]}"
        else:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            why = f"not empty ({shown}) and embedpipe did not write it"
        if not overwrite:
            raise NotOwnedError(
                f"{what} {safe_text(folder)} is {why}; choose a new or empty {what}, or pass --overwrite to write "
                "there anyway (embedpipe replaces only the files it writes: docs/DESIGN-NOTES.md, 'Ownership of "
                "outputs')"
            )
        log.warning("embedpipe: --overwrite: writing into %s, which is %s", safe_text(folder), why)
    payload = {
        "embedpipe": True,
        "kind": kind,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }
    write_json_atomic(f"{folder}/{MARKER_NAME}", payload)


def staging_name(started: datetime.datetime) -> str:
    """A new staging folder's name: its start time (UTC) and a random token."""
    return f"_staging-{started.astimezone(datetime.timezone.utc).strftime(_STAMP)}-{uuid.uuid4().hex[:12]}"


def _staging_ages(out: str) -> dict[str, float]:
    """Our staging folders under OUTPUT -> seconds since they were started (or last written)."""
    now = time.time()
    ages: dict[str, float] = {}
    if "://" in out:
        try:
            found = FileSystems.match([f"{out}/_staging-**"])[0].metadata_list
        except Exception:
            found = []
        newest: dict[str, float] = {}
        for m in found:
            name = m.path[len(out) + 1 :].split("/", 1)[0]
            newest[name] = max(newest.get(name, 0.0), m.last_updated_in_seconds or 0.0)
        stamps = {name: t for name, t in newest.items() if t > 0}  # no time known: never called old
    else:
        names = os.listdir(out) if os.path.isdir(out) else []
        stamps = {n: os.stat(os.path.join(out, n)).st_mtime for n in names if n.startswith("_staging-")}
    for name, mtime in stamps.items():
        match = _STAGING.fullmatch(name)
        if match:  # only names this module makes: a user's folder that merely starts alike is left alone
            started = match.group(1)
            if started:
                t0 = datetime.datetime.strptime(started, _STAMP).replace(tzinfo=datetime.timezone.utc)
                ages[name] = now - t0.timestamp()
            else:
                ages[name] = now - mtime
    return ages


def sweep_staging(out: str, max_age: float = STAGING_MAX_AGE) -> list[str]:
    """Remove staging folders of killed runs older than `max_age` seconds; returns their paths."""
    removed = []
    for name, age in sorted(_staging_ages(out).items()):
        if age > max_age:
            path = f"{out}/{name}"
            log.warning("embedpipe: removing %s, left %.1f h ago by a run that did not finish", path, age / 3600)
            remove_tree(path)
            removed.append(path)
    return removed


def is_embed_output(out: str) -> bool:
    """True when OUTPUT holds an embedpipe manifest (outputs written before ownership markers)."""
    try:
        manifest = json.loads(read_bounded(f"{out}/manifest.json", 1 << 20))
    except Exception:
        return False
    return isinstance(manifest, dict) and {"model", "embedding_dim"} <= manifest.keys()
