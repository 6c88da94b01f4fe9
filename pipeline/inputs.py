"""What to read: the input spec, plain data (no Beam), as the configuration and the workers carry it.

An input is one or more paths or globs (local, gs://, s3://) in one of the formats of
docs/INPUT_FORMATS.md; `InputSpec.sources()` names the format of each, `root()` the directory
ids are relative to. Listing and reading live in pipeline/read.py and pipeline/formats/.
"""

from __future__ import annotations

import dataclasses
import os

from pipeline.formats import FORMATS, META_FORMATS, TFRECORD_COMPRESSIONS, TFRECORD_IMAGE, TFRECORD_KEY, detect_format
from pipeline.paths import is_glob, resolve_input

__all__ = ["InputSpec", "carries_meta", "ids_may_repeat", "split_paths"]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What to read: paths or globs, their format, and where each format keeps ids and bytes.

    Plain data (hashable, picklable) so that it can sit in EmbedConfig and travel to workers.
    `paths` may be given as one string; it is stored as a tuple.
    """

    paths: tuple[str, ...]
    format: str = "auto"  # auto | files | tar | tfrecord | parquet | urilist
    tfrecord_key: str = TFRECORD_KEY  # feature holding the id (image/id, image/filename, ...)
    tfrecord_image: str = TFRECORD_IMAGE  # feature holding the encoded image
    tfrecord_compression: str = "auto"  # auto (sniffed per shard) | gzip | none
    parquet_image_column: str = "jpg"
    parquet_id_column: str = "key"
    urilist_uri_column: str = "uri"
    urilist_id_column: str = "id"
    # URI lists may name any path the worker can read; with allow_roots, only URIs under one
    # of these prefixes are read (others become `unreadable` rows). Empty: no restriction.
    allow_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", paths)
        roots = (self.allow_roots,) if isinstance(self.allow_roots, str) else tuple(self.allow_roots)
        object.__setattr__(self, "allow_roots", roots)
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"input needs at least one non-empty path; got {self.paths!r}")
        if self.format not in FORMATS:
            raise ValueError(f"input format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.tfrecord_compression not in TFRECORD_COMPRESSIONS:
            raise ValueError(
                f"tfrecord compression must be one of {', '.join(TFRECORD_COMPRESSIONS)}; "
                f"got {self.tfrecord_compression!r}"
            )

    @classmethod
    def of(cls, spec: str | InputSpec) -> InputSpec:
        """An InputSpec from a spec string (format auto) or an InputSpec.

        The string is one path or glob, or a comma-separated list of them (unless the
        whole string names a local file or directory: paths with commas need InputSpec).
        """
        return spec if isinstance(spec, InputSpec) else cls(paths=split_paths(spec))

    def sources(self) -> list[tuple[str, str]]:
        """(path or glob, format) per input path, with `auto` resolved from the path's name."""
        out = []
        for path in self.paths:
            fmt = self.format
            if fmt == "auto":
                # Anything without a shard extension (a directory, a glob of images) is a folder of
                # image files; a directory named like a shard (Spark's table.parquet/) holds such shards.
                fmt = detect_format(path) or "files"
            out.append((path, fmt))
        return out

    def root(self) -> str:
        """The directory ids are relative to: the common directory of every path's own root."""
        roots = [_root_of(path, fmt) for path, fmt in self.sources()]
        return _common_dir(roots)

    def ids_may_repeat(self) -> bool:
        """False only where ids are unique by construction (one `files` path): dedup can be skipped."""
        sources = self.sources()
        return len(sources) > 1 or sources[0][1] != "files"

    def carries_meta(self) -> bool:
        """True when some record can carry `meta` (tar shards): the output needs the meta column."""
        return any(fmt in META_FORMATS for _, fmt in self.sources())

    def to_dict(self) -> dict:
        """JSON-able form, for the manifest."""
        out = dataclasses.asdict(self)
        out["paths"] = list(self.paths)
        out["allow_roots"] = list(self.allow_roots)
        return out


def _root_of(path: str, fmt: str) -> str:
    """The directory a path's ids are relative to."""
    if fmt == "files" or is_glob(path):
        return resolve_input(path)[0]
    path = path.rstrip("/") if len(path) > 1 else path
    # No listing at construction time for remote paths: a name with an extension is a file.
    is_dir = os.path.isdir(path) if "://" not in path else "." not in path.rsplit("/", 1)[-1]
    if is_dir:
        return path
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _common_dir(roots: list[str]) -> str:
    """Longest common '/'-separated prefix of directories (`gs://b/x`, `gs://b/y` -> `gs://b`)."""
    parts = [r.split("/") for r in roots]
    common_parts = []
    for column in zip(*parts):
        if any(c != column[0] for c in column):
            break
        common_parts.append(column[0])
    joined = "/".join(common_parts)
    if all("://" in r for r in roots) and joined.endswith(":/"):
        joined += "/"
    return joined if joined != "" or not all(r.startswith("/") for r in roots) else "/"


def split_paths(spec: str) -> tuple[str, ...]:
    """`a.tar,b/*.tar` -> ("a.tar", "b/*.tar"); a string naming an existing local path stays whole."""
    if "," not in spec or os.path.exists(spec):
        return (spec,)
    return tuple(p.strip() for p in spec.split(",") if p.strip())


def ids_may_repeat(spec: str | InputSpec) -> bool:
    """Whether the job must run DedupIds for this input (see pipeline/dedup.py)."""
    return InputSpec.of(spec).ids_may_repeat()


def carries_meta(spec: str | InputSpec) -> bool:
    """Whether embeddings of this input need the optional `meta` column."""
    return InputSpec.of(spec).carries_meta()
