"""TFRecord shards of `tf.train.Example`, framed and checked by hand, as a stream.

A TFRecord file is a sequence of frames:

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

Reading the framing ourselves (instead of through TensorFlow or Beam's
ReadFromTFRecord, which stop the job on the first bad byte) lets us keep going
past a record whose data fails its checksum (its length was checked, so the next
frame is found), and say exactly where a truncated or damaged shard stops.
Memory holds one record at a time.

img2dataset writes its records with features `key` and `jpg` (or `png`, `webp`: its
--encode_format) instead of `image/id` and `image/encoded`. A record is read that way
only where the default image feature would find nothing (`img2dataset_features`).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator

from pipeline import reasons, storage
from pipeline.formats import TFRECORD_COMPRESSIONS, TFRECORD_IMAGE, TFRECORD_KEY, common
from pipeline.formats.example_proto import parse_example
from pipeline.records import SourceImage

log = logging.getLogger(__name__)

COMPRESSIONS = TFRECORD_COMPRESSIONS
DEFAULT_KEY, DEFAULT_IMAGE = TFRECORD_KEY, TFRECORD_IMAGE
# img2dataset's TFRecordSampleWriter: `key` (bytes) and the image under its --encode_format's name.
PEER_KEY, PEER_IMAGES = "key", ("jpg", "png", "webp")
_HEADER = 12  # uint64 length + uint32 crc of it
_FOOTER = 4
_EXAMPLE_SLACK = 1 << 20  # room for the other features of an Example beyond the image bytes

try:  # a C implementation ships with apache-beam[gcp]; Beam's own helper is the fallback
    from google_crc32c import value as _crc32c
except ImportError:  # pragma: no cover - depends on the installed extras
    from apache_beam.io.tfrecordio import _default_crc32c_fn as _crc32c


def masked_crc32c(data: bytes) -> int:
    """The checksum TFRecord stores: crc32c rotated right by 15 bits plus a constant."""
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def encode_frame(data: bytes) -> bytes:
    """One TFRecord frame around `data` (used to write test shards and by tools)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _sniff_compression(head: bytes) -> str:
    """'gzip' or 'none' from the first bytes: a valid uncompressed frame header wins over gzip magic."""
    if len(head) == _HEADER and struct.unpack("<I", head[8:])[0] == masked_crc32c(head[:8]):
        return "none"
    return "gzip" if head[:2] == b"\x1f\x8b" else "none"


def _open(path: str, compression: str):
    """(a stream of the uncompressed frames, the file handle, the compression) of a shard.

    Only regular files are opened. gzip goes through `storage.decompressed`, which
    inflates no more than each read asks for: a record skipped for its size costs
    decompression time, never its size in memory.
    """
    raw = storage.open_regular(path)  # one open (one GET on object stores): the sniffed head is put back
    try:
        stream = raw
        if compression == "auto":
            head = common.read_exact(raw, _HEADER)
            compression = _sniff_compression(head)
            stream = storage.with_head(head, raw)
        return (storage.decompressed(stream, "gzip")[0] if compression == "gzip" else stream), raw, compression
    except BaseException:
        raw.close()
        raise


def read_tfrecord(
    path: str,
    rel: str,
    *,
    key_feature: str = DEFAULT_KEY,
    image_feature: str = DEFAULT_IMAGE,
    compression: str = "auto",
    max_bytes: int,
) -> Iterator[SourceImage | dict]:
    """Every record of one TFRecord shard -> SourceImage (uri `path#index`) or an error row.

    The id is the first value of `key_feature` (bytes decoded as UTF-8, or an
    integer); a record without it gets `rel#index`. A record whose data fails its
    checksum or does not parse is one `corrupt_record` row and the shard goes on;
    a broken length header or a cut-off frame ends the shard with one
    `truncated_shard` row naming the record index and byte offset.
    With the default image feature, a record in img2dataset's layout is read from
    its `key` and `jpg` (`img2dataset_features`); the log says so once per shard.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"tfrecord compression must be one of {COMPRESSIONS}; got {compression!r}")
    shown, rel, opened, failed = common.open_shard(path, rel, opener=lambda p: _open(p, compression))
    if failed:
        yield failed
        return
    handle, raw, compression = opened
    path = shown  # from here on the path is only written into uris
    peer = image_feature == DEFAULT_IMAGE  # an image feature the user named is never second-guessed
    wanted = frozenset((key_feature, image_feature) + ((PEER_KEY, *PEER_IMAGES) if peer else ()))
    told = False
    index = offset = 0
    with raw, handle:
        try:
            while True:
                header = common.read_exact(handle, _HEADER)
                if not header:
                    return  # a clean end: the last frame was whole
                if len(header) < _HEADER:
                    raise _Damage(f"the frame header has {len(header)} of its {_HEADER} bytes")
                (length,) = struct.unpack("<Q", header[:8])
                if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
                    raise _Damage("the length fails its checksum (not a TFRecord, or damaged here)")
                uri = f"{path}#{index}"
                if length > max_bytes + _EXAMPLE_SLACK:
                    skipped = common.skip_exact(handle, length + _FOOTER)
                    if skipped < length + _FOOTER:
                        raise _Damage(f"the record has {skipped:,} of its {length + _FOOTER:,} bytes")
                    yield common.record_error(
                        f"{rel}#{index}", uri, reasons.TOO_LARGE, common.too_large_message(length, max_bytes)
                    )
                else:
                    data = common.read_exact(handle, length)
                    footer = common.read_exact(handle, _FOOTER)
                    if len(data) < length or len(footer) < _FOOTER:
                        raise _Damage(f"the record has {len(data) + len(footer):,} of its {length + _FOOTER:,} bytes")
                    if struct.unpack("<I", footer)[0] != masked_crc32c(data):
                        yield common.record_error(
                            f"{rel}#{index}",
                            uri,
                            common.CORRUPT_RECORD,
                            f"record {index} at byte {offset:,} fails its data checksum",
                        )
                    else:
                        item, used = _record(data, rel, uri, index, key_feature, image_feature, wanted, max_bytes)
                        if used != (key_feature, image_feature) and not told:
                            told = True
                            log.info(
                                "%s: record %d has no %r feature; read in img2dataset's layout: image %r, id %r",
                                path,
                                index,
                                image_feature,
                                used[1],
                                used[0],
                            )
                        yield item
                index += 1
                offset += _HEADER + length + _FOOTER
        except Exception as exc:
            # A bad length header or a cut-off frame leaves no way to find the next frame.
            yield common.shard_error(
                rel,
                path,
                str(index),
                common.TRUNCATED_SHARD,
                f"TFRecord stream truncated or damaged at record {index}, byte {offset:,}"
                f"{' (uncompressed)' if compression == 'gzip' else ''}: "
                f"{exc if isinstance(exc, _Damage) else common.describe(exc)}; "
                "the rest of the shard could not be read",
            )


class _Damage(Exception):
    """The framing is broken here: nothing after this point can be located."""


def img2dataset_features(features: dict[str, list], key_feature: str, image_feature: str) -> tuple[str, str]:
    """(key feature, image feature) to read one parsed record with.

    The configured pair, except where the image feature is the default, the record has
    no such feature, and it has img2dataset's `key` and exactly one of `jpg`, `png`,
    `webp`: then that one, and `key` unless the record has `key_feature`. So a record
    that the configured features can read is read as before; only one that would be an
    `empty_file` row is read from img2dataset's features.
    """
    if image_feature != DEFAULT_IMAGE or image_feature in features or PEER_KEY not in features:
        return key_feature, image_feature
    images = [name for name in PEER_IMAGES if name in features]
    if len(images) != 1:
        return key_feature, image_feature
    return (key_feature if key_feature in features else PEER_KEY), images[0]


def _record(
    data: bytes,
    rel: str,
    uri: str,
    index: int,
    key_feature: str,
    image_feature: str,
    wanted: frozenset[str],
    max_bytes: int,
) -> tuple[SourceImage | dict, tuple[str, str]]:
    """(the image or error row of one record, the (key, image) features it was read with)."""
    fallback = f"{rel}#{index}"
    try:
        features = parse_example(data, wanted)
    except Exception as exc:  # any parse failure is this record's damage: the shard goes on
        error = common.record_error(fallback, uri, common.CORRUPT_RECORD, f"not a tf.train.Example: {exc}")
        return error, (key_feature, image_feature)
    used = key_feature, image_feature = img2dataset_features(features, key_feature, image_feature)
    keys = features.get(key_feature) or []
    key = keys[0] if keys else None
    rid = (key.decode("utf-8", errors="replace") if isinstance(key, bytes) else str(key)) if key is not None else ""
    if len(rid) > common.MAX_ID_BYTES:
        message = f"the id feature {key_feature!r} holds {len(rid):,} characters (over {common.MAX_ID_BYTES:,})"
        return common.record_error(fallback, uri, common.CORRUPT_RECORD, message), used
    rid = rid or fallback
    images = features.get(image_feature) or []
    if not images or not images[0]:
        return common.record_error(rid, uri, reasons.EMPTY_FILE, _no_image(image_feature, features)), used
    if len(images[0]) > max_bytes:
        too_large = common.too_large_message(len(images[0]), max_bytes)
        return common.record_error(rid, uri, reasons.TOO_LARGE, too_large), used
    return SourceImage(rid, uri, images[0]), used


def _no_image(image_feature: str, features: dict[str, list]) -> str:
    """The message of a record without image bytes: what it has instead, and what to do."""
    if image_feature in features:
        return f"the record's {image_feature!r} feature holds no bytes"
    peers = ", ".join(repr(name) for name in PEER_IMAGES if name in features)
    found = f" (it has {peers})" if peers else ""
    return f"record has no {image_feature!r} feature{found}: name the image feature with --tfrecord-image"
