"""Property-based fuzzing of everything that parses untrusted bytes: the image decoder, the
tf.train.Example parser and the tar / TFRecord / Parquet / URI-list shard readers.

The property is the project's rule for bad input: a reader never raises and never hangs; it
yields images or error rows whose ids and uris are valid text and whose reasons are known codes.
The decoder raises only DecodeError. Inputs are valid seeds mutated by hypothesis (byte edits,
cuts, insertions) plus raw bytes; runs are derandomized (seeded), so CI sees the same cases
every time.

Every input that once broke a reader is kept under tests/fuzz_corpus/<target>/ and replayed
by `test_corpus_replays`. Longer campaigns (not CI):

    EMBEDPIPE_FUZZ_EXAMPLES=20000 EMBEDPIPE_FUZZ_SAVE=1 python -m pytest tests/test_fuzz.py -p no:randomly

save each new failing input to the corpus before hypothesis shrinks it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pathlib
import signal
import tarfile
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from odd_images import encode, photo
from shard_fixtures import proto_field

from pipeline import reasons
from pipeline.formats.example_proto import ExampleParseError, parse_example
from pipeline.formats.parquet import read_parquet
from pipeline.formats.tar import read_tar
from pipeline.formats.tfrecord import encode_frame, read_tfrecord
from pipeline.formats.urilist import read_list
from pipeline.imaging import DecodeError, decode_image
from pipeline.records import SourceImage

CORPUS = pathlib.Path(__file__).parent / "fuzz_corpus"
EXAMPLES = int(os.environ.get("EMBEDPIPE_FUZZ_EXAMPLES", "60"))
SAVE = os.environ.get("EMBEDPIPE_FUZZ_SAVE") == "1"
MAX_BYTES = 1 << 20
SECONDS_PER_INPUT = 20  # far above any real case (milliseconds): only a hang reaches it
KNOWN_REASONS = {v for k, v in vars(reasons).items() if k.isupper() and isinstance(v, str)}

FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---- seeds: small valid inputs of every format ---------------------------------------------------


def _jpeg(seed: int = 0) -> bytes:
    return encode(photo((24 + seed, 20)), "JPEG", quality=80)


def _example(key: str, image: bytes) -> bytes:
    """A tf.train.Example with image/id and image/encoded, encoded by hand (field numbers of example.proto)."""

    def entry(name: str, value: bytes) -> bytes:
        feature = proto_field(1, 2, proto_field(1, 2, value))  # Feature.bytes_list.value
        return proto_field(1, 2, proto_field(1, 2, name.encode()) + proto_field(2, 2, feature))  # a map entry

    return proto_field(1, 2, entry("image/id", key.encode()) + entry("image/encoded", image))


def _tar(compress: bool = False) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in (("a.jpg", _jpeg(0)), ("a.json", b'{"k": 1}'), ("b.c.png", encode(photo((8, 8)), "PNG"))):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    data = raw.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def _tfrecord(compress: bool = False) -> bytes:
    data = b"".join(encode_frame(_example(f"k{i}", _jpeg(i))) for i in range(2))
    return gzip.compress(data, mtime=0) if compress else data


def _parquet() -> bytes:
    table = pa.table({"key": ["p0", "p1", None], "jpg": pa.array([_jpeg(0), b"", _jpeg(1)], pa.binary())})
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=2)
    return out.getvalue()


SEEDS = {
    "image": [_jpeg(0), encode(photo((9, 7)), "PNG"), encode(photo((9, 7)), "GIF"), encode(photo((9, 7)), "WEBP")],
    "example": [_example("k", _jpeg(0))],
    "tar": [_tar(), _tar(compress=True)],
    "tfrecord": [_tfrecord(), _tfrecord(compress=True)],
    "parquet": [_parquet()],
    "urilist": [b"a.jpg\n# comment\n\nsub/b.jpg\n", b'uri,id\na.jpg,one\n,two\n"b,c.jpg",3\n'],
}
SUFFIX = {"tar": ".tar", "tfrecord": ".tfrecord", "parquet": ".parquet", "urilist": ".txt"}


@st.composite
def mutated(draw, target: str) -> bytes:
    """A seed of `target` with byte edits, a cut and an insertion, or raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(SEEDS[target])))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    if draw(st.integers(0, 3)) == 0:
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


# ---- the properties ------------------------------------------------------------------------------


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    def alarm(signum, frame):
        raise _Hang(f"no result within {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _save(target: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"crash-{hashlib.sha256(data).hexdigest()[:16]}.bin").write_bytes(data)


def _check_item(item) -> None:
    if isinstance(item, SourceImage):
        assert isinstance(item.data, bytes) and item.data
        texts = (item.id, item.uri)
    else:
        assert isinstance(item, dict), item
        assert item["error"] in KNOWN_REASONS, item
        assert item["message"]
        texts = (item["id"], item["uri"], item["message"])
    for text in texts:
        text.encode("utf-8")  # valid text: a Beam str and a Parquet string


def _read_all(target: str, data: bytes) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shard" + SUFFIX[target])
        with open(path, "wb") as out:
            out.write(data)
        if target == "tar":
            return list(read_tar(path, "shard.tar", max_bytes=MAX_BYTES))
        if target == "tfrecord":
            return list(read_tfrecord(path, "shard.tfrecord", max_bytes=MAX_BYTES))
        if target == "parquet":
            return list(read_parquet(path, "shard.parquet", max_bytes=MAX_BYTES))
        return list(read_list(path, "list.txt"))


def check(target: str, data: bytes) -> None:
    """The property of one target on one input; saves the input first when asked to and it fails."""
    try:
        with _time_limit(SECONDS_PER_INPUT):
            if target == "image":
                try:
                    pixels, width, height, _ = decode_image(data, size=32, max_pixels=4_000_000)
                except DecodeError as exc:
                    assert exc.reason in KNOWN_REASONS and str(exc)
                else:
                    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8 and width >= 1 and height >= 1
            elif target == "example":
                with contextlib.suppress(ExampleParseError):
                    parse_example(data, frozenset({"image/id", "image/encoded"}))
            else:
                items = _read_all(target, data)
                for item in items:
                    if isinstance(item, tuple):  # (id or None, uri, position) from a URI list
                        rid, uri, position = item
                        for text in (rid or "", uri, position):
                            text.encode("utf-8")
                    else:
                        _check_item(item)
    except BaseException:
        if SAVE:
            _save(target, data)
        raise


@pytest.mark.parametrize("target", sorted(SEEDS))
def test_seeds_are_read_whole(target):
    for seed in SEEDS[target]:
        check(target, seed)
    if target in ("tar", "tfrecord", "parquet"):
        images = [i for i in _read_all(target, SEEDS[target][0]) if isinstance(i, SourceImage)]
        assert len(images) >= 2, "the seeds are valid shards: fuzzing starts from real structure"


@FUZZ
@given(data=mutated("image"))
def test_fuzz_decode_image(data):
    check("image", data)


@FUZZ
@given(data=mutated("example"))
def test_fuzz_parse_example(data):
    check("example", data)


@FUZZ
@given(data=mutated("tar"))
def test_fuzz_tar_reader(data):
    check("tar", data)


@FUZZ
@given(data=mutated("tfrecord"))
def test_fuzz_tfrecord_reader(data):
    check("tfrecord", data)


@FUZZ
@given(data=mutated("parquet"))
def test_fuzz_parquet_reader(data):
    check("parquet", data)


@FUZZ
@given(data=mutated("urilist"))
def test_fuzz_urilist_reader(data):
    check("urilist", data)


def _corpus() -> list[tuple[str, pathlib.Path]]:
    return sorted((p.parent.name, p) for p in CORPUS.glob("*/*.bin"))


@pytest.mark.parametrize(("target", "path"), _corpus(), ids=lambda v: v.name if isinstance(v, pathlib.Path) else v)
def test_corpus_replays(target, path):
    """Inputs that once broke a reader (kept as regression cases)."""
    check(target, path.read_bytes())
