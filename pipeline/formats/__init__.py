"""Readers of the input formats: one module per format, one streaming generator per shard.

`detect_format` names the format of a path from its extension; pipeline/read.py
turns an input spec into shards and calls the reader of each.
"""

from __future__ import annotations

import re

from pipeline.reasons import CORRUPT_RECORD, TRUNCATED_SHARD

FORMATS = ("auto", "files", "tar", "tfrecord", "parquet", "urilist")
SHARD_FORMATS = ("tar", "tfrecord", "parquet", "urilist")
META_FORMATS = ("tar",)  # formats whose records can carry `meta`
# TFRecord options' values and defaults (the input spec and the reader share them).
TFRECORD_COMPRESSIONS = ("auto", "gzip", "none")
TFRECORD_KEY, TFRECORD_IMAGE = "image/id", "image/encoded"

_TAR = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tbz2|tar\.xz|txz)$")
# TFDS names its shards name.tfrecord-00000-of-00010; gzip'd ones often end in .gz
_TFRECORD = re.compile(r"\.(tfrecords?|tfrec)(-\d+-of-\d+)?(\.gz|\.gzip)?$")
_PARQUET = re.compile(r"\.parquet$")
_URILIST = re.compile(r"\.(txt|lst|list|uris|csv)(\.gz)?$")
# A glob whose name ends in wildcards after a shard extension names that format: `train.tfrecord-*`,
# `*.tfrecord*`, `part-*.parquet*`, `*.tar.*`. Only extensions of one format each count; a wildcard
# inside the extension (`*.tf*`), or text after the wildcard (`*.tar*gz`), leaves it to --input-format.
_WILD = r"[*?]*$"
_TAR_GLOB = re.compile(r"\.(tar|tgz|tbz2|txz)(\.(gz|bz2|xz|[*?]+))?" + _WILD)
_TFRECORD_GLOB = re.compile(r"\.(tfrecords?|tfrec)(-[-0-9of*?\[\]]*)?(\.gz|\.gzip)?" + _WILD)
_PARQUET_GLOB = re.compile(r"\.parquet" + _WILD)
_GLOB_CHARS = "*?["

__all__ = [
    "CORRUPT_RECORD",
    "FORMATS",
    "META_FORMATS",
    "SHARD_FORMATS",
    "TFRECORD_COMPRESSIONS",
    "TFRECORD_IMAGE",
    "TFRECORD_KEY",
    "TRUNCATED_SHARD",
    "detect_format",
]


def detect_format(path: str) -> str | None:
    """The shard format a path's name implies, or None (a directory, an image, anything else).

    A Parquet file is taken for image bytes (`parquet`); a Parquet list of URIs
    needs `--input-format urilist`. A glob's name may end in wildcards after a shard
    extension (`data/train.tfrecord-*`): the extension names the format.
    """
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for fmt, pattern in (("tar", _TAR), ("tfrecord", _TFRECORD), ("parquet", _PARQUET), ("urilist", _URILIST)):
        if pattern.search(name):
            return fmt
    if any(c in name for c in _GLOB_CHARS):
        found = [
            f
            for f, p in (("tar", _TAR_GLOB), ("tfrecord", _TFRECORD_GLOB), ("parquet", _PARQUET_GLOB))
            if p.search(name)
        ]
        if len(found) == 1:
            return found[0]
    return None


def matches_format(path: str, fmt: str) -> bool:
    """True when a file found under a directory belongs to `fmt` (by name; urilist also takes .parquet)."""
    found = detect_format(path)
    return found == fmt or (fmt == "urilist" and found == "parquet")
