"""The DoFns behind ReadImages' shard branch: match shards, read each one as a stream, read listed URIs.

They stay apart from pipeline/read.py (the input spec and the composite
transform) so that each module keeps to one job.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline import reasons
from pipeline.formats import common, matches_format
from pipeline.formats.files import is_glob, list_local, relative_id
from pipeline.formats.parquet import read_parquet
from pipeline.formats.tar import read_tar
from pipeline.formats.tfrecord import read_tfrecord
from pipeline.formats.urilist import read_list, read_uri, uri_id
from pipeline.records import SourceImage

if TYPE_CHECKING:
    from pipeline.read import InputSpec


class MatchShardsFn(beam.DoFn):
    """(pattern, format) -> (shard path, format) per file, or an error row when nothing is there.

    A literal path that is a directory stands for the files of that format under it.
    """

    def __init__(self, root: str) -> None:
        self._root = root

    def process(self, source: tuple[str, str]):
        pattern, fmt = source
        try:
            found, broken = _match(pattern)
            is_dir = not is_glob(pattern) and (os.path.isdir(pattern) if "://" not in pattern else not found)
            if is_dir:
                found, broken = _match(f"{pattern.rstrip('/')}/**")
                found = [path for path in found if matches_format(path, fmt)]
        except Exception as exc:
            yield beam.pvalue.TaggedOutput(
                "errors",
                common.record_error(pattern, pattern, reasons.UNREADABLE, f"cannot list: {common.describe(exc)}"),
            )
            return
        for path, exc in broken:
            yield beam.pvalue.TaggedOutput(
                "errors",
                common.record_error(relative_id(self._root, path), path, reasons.UNREADABLE, common.describe(exc)),
            )
        if not found and not broken:
            # Not a crash (the rest of the input is still read), but never an empty, silent success either.
            yield beam.pvalue.TaggedOutput(
                "errors",
                common.record_error(
                    relative_id(self._root, pattern), pattern, reasons.UNREADABLE, f"no {fmt} shards match {pattern!r}"
                ),
            )
        for path in found:
            yield path, fmt


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

    def process(self, shard: tuple[str, str]):
        path, fmt = shard
        rel = relative_id(self._root, path)
        count = 0
        try:
            for item in self._records(path, fmt, rel):
                count += 1
                if isinstance(item, SourceImage):
                    yield item
                elif isinstance(item, tuple):  # (id or None, uri, position) from a URI list
                    rid, uri, _ = item
                    yield beam.pvalue.TaggedOutput("uris", (rid or uri_id(self._root, uri), uri))
                else:
                    yield beam.pvalue.TaggedOutput("errors", item)
        except Exception as exc:  # readers report damage themselves; this is the net for the unforeseen
            yield beam.pvalue.TaggedOutput(
                "errors",
                common.shard_error(
                    rel,
                    path,
                    f"after={count}",
                    reasons.UNREADABLE,
                    f"reading stopped after {count} records: {common.describe(exc)}",
                ),
            )


class ReadUriFn(beam.DoFn):
    """(id, uri) -> SourceImage, or an `unreadable` / `too_large` row (output "errors")."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes

    def process(self, entry: tuple[str, str]):
        rid, uri = entry
        out = read_uri(rid, uri, max_bytes=self._max_bytes)
        yield out if isinstance(out, SourceImage) else beam.pvalue.TaggedOutput("errors", out)


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
