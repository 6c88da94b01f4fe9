"""The DoFns behind ReadImages' shard branch: match shards, read each one as a stream, read listed URIs.

They stay apart from pipeline/read.py (the input spec and the composite
transform) so that each module keeps to one job.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import re
import threading
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline import reasons, storage
from pipeline.bundles import in_global_window
from pipeline.formats import common, detect_format, matches_format
from pipeline.formats.files import ListingError, list_local, relative_id
from pipeline.formats.parquet import read_parquet
from pipeline.formats.tar import read_tar
from pipeline.formats.tfrecord import read_tfrecord
from pipeline.formats.urilist import read_list, read_uri, uri_id, within_roots
from pipeline.inputs import InputSpec
from pipeline.paths import is_glob, is_image_path, resolve_input
from pipeline.records import SourceImage


class MatchShardsFn(beam.DoFn):
    """(pattern, format) -> (shard path, format) per file, or an error row when nothing is there.

    A literal path that is a directory stands for the files of that format under it.
    """

    def __init__(self, root: str) -> None:
        self._root = root

    def process(self, source: tuple[str | bytes, str]):
        pattern, fmt = from_wire(source[0]), source[1]  # a pattern that is not UTF-8 may arrive as bytes
        listed: list[str] = []  # every file seen under a directory, for the message when none is a shard
        try:
            found, broken = _match(pattern)
            local = "://" not in pattern
            is_dir = not is_glob(pattern) and (os.path.isdir(pattern) if local else not found)
            if is_dir:
                listed, broken = _match(f"{pattern.rstrip('/')}/**")
                found = [path for path in listed if matches_format(path, fmt)]
                # An unreadable entry under a folder is an input only if it is named like one of its shards
                # (a dangling README link or a lock FIFO there is not); folders not listed always count.
                broken = [(p, e) for p, e in broken if isinstance(e, ListingError) or matches_format(p, fmt)]
        except Exception as exc:
            yield beam.pvalue.TaggedOutput(
                "errors",
                common.record_error(
                    storage.safe_text(pattern),
                    storage.safe_text(pattern),
                    reasons.UNREADABLE,
                    f"cannot list: {common.describe(exc)}",
                ),
            )
            return
        for path, exc in broken:
            shown = storage.safe_text(path)
            yield beam.pvalue.TaggedOutput(
                "errors",
                common.record_error(
                    storage.safe_text(relative_id(self._root, path)), shown, reasons.UNREADABLE, common.describe(exc)
                ),
            )
        if not found and not broken:
            # Not a crash (the rest of the input is still read), but never an empty, silent success either.
            rid, shown = storage.safe_text(relative_id(self._root, pattern)), storage.safe_text(pattern)
            if local and not is_glob(pattern) and not os.path.lexists(pattern):
                reason, message = reasons.UNREADABLE, f"{shown!r} does not exist"
            else:
                reason, message = reasons.EMPTY_INPUT, empty_input_message(pattern, fmt, listed if is_dir else None)
            yield beam.pvalue.TaggedOutput("errors", common.record_error(rid, shown, reason, message))
        for path in found:
            yield to_wire(path), fmt


def to_wire(path: str) -> str | bytes:
    """A path as Beam can encode it: a name that is not UTF-8 (lone surrogates) travels as its bytes.

    Beam's coders encode text as strict UTF-8; the reader needs the exact name to open
    the file, so the bytes travel and `from_wire` restores the name.
    """
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def from_wire(path: str | bytes) -> str:
    """The path `to_wire` was given."""
    return os.fsdecode(path) if isinstance(path, bytes) else path


SURVEY_LIMIT = 10_000  # files looked at to say what an input without shards holds


def _kind(name: str) -> str:
    """The extension a name shows in a survey: `.tar.gz`, `.jpg`, `.tfrecord-N-of-N`, or `(none)`."""
    base = name.rsplit("/", 1)[-1].lower()
    base = re.sub(r"-\d+-of-\d+", "-N-of-N", base)
    found = re.search(r"(\.[^.]+)(\.(gz|gzip|bz2|xz))?$", base)
    return found.group(0) if found else "(none)"


def empty_input_message(pattern: str, fmt: str, listed: list[str] | None = None) -> str:
    """Why an input gave no shard: what is under it (count, extensions) and the format its names suggest.

    `listed` is the files found under a directory input; for a glob the directory
    before its first wildcard is listed (at most SURVEY_LIMIT files).
    """
    where = pattern.rstrip("/") if listed is not None else (resolve_input(pattern)[0] or ".")
    if listed is None:
        try:
            listed = _survey(where)
        except Exception as exc:  # the message is a courtesy: never fail the row for it
            listed = []
            where = f"{where} (cannot list: {common.describe(exc)})"
    names, where = [storage.safe_text(p) for p in listed], storage.safe_text(where)
    if not names:
        return f"no {fmt} shards match {storage.safe_text(pattern)!r}: nothing found under {where!r}"
    kinds = collections.Counter(_kind(n) for n in names).most_common()
    shown = ", ".join(f"{k}: {n}" for k, n in kinds[:6]) + (", ..." if len(kinds) > 6 else "")
    count = f"{'at least ' if len(names) >= SURVEY_LIMIT else ''}{len(names):,} file{'s' if len(names) != 1 else ''}"
    formats = collections.Counter(detect_format(n) or ("files" if is_image_path(n) else None) for n in names)
    other = next((f for f, _ in formats.most_common() if f not in (None, fmt)), None)
    hint = f"; did you mean --input-format {other}?" if other else ""
    return f"no {fmt} shards match {storage.safe_text(pattern)!r}: {count} under {where!r} ({shown}){hint}"


def _survey(where: str) -> list[str]:
    """Up to SURVEY_LIMIT file paths under a directory (local or any Beam filesystem)."""
    if "://" in where:
        return [m.path for m in FileSystems.match([f"{where.rstrip('/')}/**"], limits=[SURVEY_LIMIT])[0].metadata_list]
    out: list[str] = []
    for directory, _, names in os.walk(where):
        out.extend(os.path.join(directory, n) for n in names[: SURVEY_LIMIT - len(out)])
        if len(out) >= SURVEY_LIMIT:
            break
    return out


def _match(pattern: str) -> tuple[list[str], list[tuple[str, Exception]]]:
    """(paths, [(path, error)]) of a pattern; locally, entries that cannot be stat'ed are not dropped."""
    if "://" in pattern:
        return [m.path for m in FileSystems.match([pattern])[0].metadata_list], []
    found, broken = [], []
    for entry in list_local(pattern):
        if isinstance(entry, tuple):
            broken.append(entry)
        else:
            found.append(entry.path)
    return found, broken


class ReadShardFn(beam.DoFn):
    """(shard path, format) -> SourceImage per record (main), error rows ("errors"), listed URIs ("uris")."""

    def __init__(self, spec: InputSpec, root: str, max_bytes: int) -> None:
        self._spec = spec
        self._root = root
        self._max_bytes = max_bytes

    def _records(self, path: str, fmt: str, rel: str):
        spec = self._spec
        if fmt == "tar":
            return read_tar(path, rel, max_bytes=self._max_bytes)
        if fmt == "tfrecord":
            return read_tfrecord(
                path,
                rel,
                key_feature=spec.tfrecord_key,
                image_feature=spec.tfrecord_image,
                compression=spec.tfrecord_compression,
                max_bytes=self._max_bytes,
            )
        if fmt == "parquet":
            return read_parquet(
                path,
                rel,
                image_column=spec.parquet_image_column,
                id_column=spec.parquet_id_column,
                max_bytes=self._max_bytes,
            )
        if fmt == "urilist":
            return read_list(path, rel, uri_column=spec.urilist_uri_column, id_column=spec.urilist_id_column)
        raise ValueError(f"not a shard format: {fmt!r}")

    def process(self, shard: tuple[str | bytes, str]):
        path, fmt = from_wire(shard[0]), shard[1]
        rel = storage.safe_text(relative_id(self._root, path))
        roots = self._spec.allow_roots
        count = 0
        try:
            for item in self._records(path, fmt, rel):
                count += 1
                if isinstance(item, SourceImage):
                    yield item
                elif isinstance(item, tuple):  # (id or None, uri, position) from a URI list
                    rid, uri, _ = item
                    rid = storage.safe_text(rid or uri_id(self._root, uri))
                    if within_roots(uri, roots):
                        yield beam.pvalue.TaggedOutput("uris", (rid, to_wire(uri)))
                    else:
                        yield beam.pvalue.TaggedOutput("errors", outside_roots_row(rid, uri, roots))
                else:
                    yield beam.pvalue.TaggedOutput("errors", item)
        except Exception as exc:  # readers report damage themselves; this is the net for the unforeseen
            yield beam.pvalue.TaggedOutput(
                "errors",
                common.shard_error(
                    rel,
                    storage.safe_text(path),
                    f"after={count}",
                    reasons.UNREADABLE,
                    f"reading stopped after {count} records: {common.describe(exc)}",
                ),
            )


def outside_roots_row(rid: str, uri: str, roots: tuple[str, ...]) -> dict:
    """The `unreadable` row of a listed URI that --allow-roots does not admit (it is never opened)."""
    shown = storage.safe_text(uri)
    return common.record_error(
        storage.safe_text(rid),
        shown,
        reasons.UNREADABLE,
        f"{shown} is outside --allow-roots ({', '.join(roots)}); a URI list may only name files under them",
    )


URI_THREADS = 16  # reads in flight per worker process: object-store latency, not CPU, is the limit
SLOW_FAILURE_S = 30.0  # a read that fails after longer than this marks its bucket or host as failing slowly
FAIL_FAST_S = 300.0  # ... and later reads from there fail at once for this long


def source_of(uri: str) -> str | None:
    """The bucket or host of a remote URI (`gs://bucket`), None for a local path."""
    if "://" not in uri:
        return None
    scheme, rest = uri.split("://", 1)
    return f"{scheme.lower()}://{rest.split('/', 1)[0]}"


class SlowSources:
    """Buckets and hosts whose reads failed slowly, per worker process, each for a bounded time.

    An unreachable bucket costs the client's whole retry schedule (~110 s on GCS) per
    URI; after one such failure the other URIs of that bucket fail at once, naming it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing: dict[str, tuple[float, str]] = {}  # source -> (until, first failure)

    def blocked(self, source: str) -> str | None:
        """The first failure's message while `source` fails fast, else None."""
        with self._lock:
            until, first = self._failing.get(source, (0.0, ""))
            if time.monotonic() < until:
                return first
            self._failing.pop(source, None)
            return None

    def failed(self, source: str, message: str, fail_fast_s: float) -> None:
        """Record a slow failure; the first one stays the one named until its time runs out."""
        with self._lock:
            until, _ = self._failing.get(source, (0.0, ""))
            if time.monotonic() >= until:
                self._failing[source] = (time.monotonic() + fail_fast_s, message)

    def clear(self) -> None:
        """Forget every slow source (a forked child starts clean)."""
        with self._lock:
            self._failing.clear()


SLOW_SOURCES = SlowSources()
_URI_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_URI_POOLS_LOCK = threading.Lock()


def _after_fork() -> None:
    _URI_POOLS.clear()  # the child has the pool objects but not their threads
    SLOW_SOURCES.clear()


os.register_at_fork(after_in_child=_after_fork)


def uri_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide pool reading listed URIs (shared by every ReadUriFn of the process)."""
    with _URI_POOLS_LOCK:
        pool = _URI_POOLS.get(threads)
        if pool is None:
            pool = _URI_POOLS[threads] = concurrent.futures.ThreadPoolExecutor(
                threads, thread_name_prefix="embedpipe-uri"
            )
        return pool


def fetch_uri(rid: str, uri: str, *, max_bytes: int, slow_failure_s: float, fail_fast_s: float) -> SourceImage | dict:
    """read_uri, failing at once for a source that failed slowly in this process a moment ago."""
    source = source_of(uri)
    first = SLOW_SOURCES.blocked(source) if source else None
    if first is not None:
        return common.record_error(
            storage.safe_text(rid),
            storage.safe_text(uri),
            reasons.UNREADABLE,
            f"not read: {source} failed slowly in this worker a moment ago ({first}); its reads fail at once for "
            f"{fail_fast_s:.0f} s: check that it is reachable and run again",
        )
    start = time.monotonic()
    out = read_uri(rid, uri, max_bytes=max_bytes)
    took = time.monotonic() - start
    if source and isinstance(out, dict) and out["error"] == reasons.UNREADABLE and took > slow_failure_s:
        SLOW_SOURCES.failed(source, f"{out['uri']} failed after {took:.0f} s: {out['message']}", fail_fast_s)
    return out


class ReadUriFn(beam.DoFn):
    """(id, uri) -> SourceImage, or an `unreadable` / `too_large` row (output "errors").

    URIs are read on a process-wide thread pool, a bounded number ahead of the
    bundle, in order; what is still in flight at the end of a bundle is emitted from
    finish_bundle (global window: batch pipelines). After a read fails slowly
    (`slow_failure_s`), the rest of that bucket or host fails at once for
    `fail_fast_s` (see SlowSources).
    """

    def __init__(
        self,
        max_bytes: int,
        *,
        threads: int = URI_THREADS,
        slow_failure_s: float = SLOW_FAILURE_S,
        fail_fast_s: float = FAIL_FAST_S,
    ) -> None:
        self._kwargs = dict(max_bytes=max_bytes, slow_failure_s=slow_failure_s, fail_fast_s=fail_fast_s)
        self._threads = threads

    def setup(self) -> None:
        self._pool = uri_pool(self._threads)
        # Enough to keep every thread busy; few enough that at most this many images
        # (each at most --max-bytes) wait in memory.
        self._ahead = 2 * self._threads

    def start_bundle(self) -> None:
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()

    @staticmethod
    def _emit(future: concurrent.futures.Future):
        out = future.result()
        return out if isinstance(out, SourceImage) else beam.pvalue.TaggedOutput("errors", out)

    def process(self, entry: tuple[str, str | bytes]):
        rid, uri = entry[0], from_wire(entry[1])
        self._pending.append(self._pool.submit(fetch_uri, rid, uri, **self._kwargs))
        while len(self._pending) > self._ahead:
            yield self._emit(self._pending.popleft())

    def finish_bundle(self):
        while self._pending:
            yield in_global_window(self._emit(self._pending.popleft()))


class CountFn(beam.DoFn):
    """Counts what ReadImages hands on: every input record is exactly one image or one error row."""

    def __init__(self, *names: str) -> None:
        self._names = names

    def setup(self) -> None:
        self._counters = [Metrics.counter("embedpipe", n) for n in self._names]

    def process(self, element):
        for counter in self._counters:
            counter.inc()
        yield element
