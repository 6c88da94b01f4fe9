"""The GPU decode path (nvImageCodec + device resize), run on nvImageCodec's CPU backend.

The code under test is the code a GPU worker runs: `BatchDecoder(device="cpu")` differs from
`device="gpu"` only in the nvImageCodec backend it asks for. What it must give is what the CPU
path (`decode.decode_one`) gives: the same rows, ids, sha256, sizes, reasons and messages, and
pixels close enough that vectors meet the closeness bound of tests/test_closeness.py.
"""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from odd_images import cmyk_jpeg, encode, grayscale_jpeg, photo, rgba_png, truncated_jpeg
from PIL import Image

pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec is not installed (requirements-dev.txt brings it)")

from pipeline import gpu_decode, gpu_routing, resize
from pipeline.decode import decode_one
from pipeline.imaging import _TRANSPOSE, _resize
from pipeline.records import DecodedImage, SourceImage
from pipeline.sample import photos, variant

LIMIT = 100_000_000


def jpeg(img: Image.Image, **kwargs) -> bytes:
    kwargs.setdefault("quality", 92)
    return encode(img, "JPEG", **kwargs)


def oriented_jpeg(orientation: int, size: tuple[int, int] = (90, 60)) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(photo(size, "chelsea"), exif=exif.tobytes())


def cpu_kwargs(size: int, mode: str = "squash", *, draft: bool = True, thumbnail: bool = False, limit=LIMIT) -> dict:
    return dict(size=size, resize=mode, max_pixels=limit, draft=draft, thumbnail=thumbnail)


def decoder(size: int, mode: str = "squash", **kwargs) -> gpu_decode.BatchDecoder:
    kwargs.setdefault("max_pixels", LIMIT)
    return gpu_decode.BatchDecoder(size=size, resize=mode, device="cpu", **kwargs)


def host(pixels) -> np.ndarray:
    return np.asarray(pixels)


# ----------------------------------------------------------------------------- resize geometry


@pytest.mark.parametrize("orientation", range(1, 9))
def test_resize_weights_reproduce_pillows_resize_of_the_oriented_image(orientation):
    """The weights fold orientation, reduce, triangle filter and center-crop into A @ R @ B.T."""
    raw = photo((301, 187), "coffee")
    oriented = raw if orientation == 1 else raw.transpose(_TRANSPOSE[orientation])
    arr = np.asarray(raw)
    for size, mode in ((40, "squash"), (40, "center-crop"), (250, "center-crop"), (16, "squash")):
        reference = np.asarray(_resize(oriented, size, mode)).astype(int)
        got = resize.apply_numpy(arr, resize.plan(301, 187, orientation, size=size, mode=mode)).astype(int)
        assert got.shape == reference.shape
        # Pillow rounds to uint8 after each pass; the weights round once.
        assert np.abs(got - reference).max() <= 1, (size, mode)
    small = oriented.copy()
    small.thumbnail((128, 128), Image.Resampling.BILINEAR)
    got = resize.apply_numpy(arr, resize.thumbnail_plan(301, 187, orientation, box=128))
    assert got.shape[:2] == (small.height, small.width)
    assert np.abs(got.astype(int) - np.asarray(small).astype(int)).max() <= 1


@pytest.mark.parametrize("buckets", [False, True], ids=["as-is", "buckets"])
def test_device_resize_matches_the_host_reference_with_bounded_programs(buckets):
    """As-is: what TensorFlow runs (one trace for every size). Buckets: what JAX runs (inputs
    padded to bucket sizes, one band width per bucket), exercised here on the same backend."""
    from keras import ops

    resizer = resize.DeviceResizer(buckets=buckets)
    sizes = ((301, 187, 1), (187, 301, 6), (64, 100, 3), (1000, 40, 8), (290, 200, 2), (260, 170, 5))
    for w, h, orientation in sizes:
        arr = np.asarray(photo((w, h), "astronaut"))
        for mode in ("squash", "center-crop"):
            p = resize.plan(w, h, orientation, size=48, mode=mode)
            got = host(resizer(ops.convert_to_tensor(arr), p, out_rows=48))
            assert np.abs(got.astype(int) - resize.apply_numpy(arr, p).astype(int)).max() <= 1, (w, h, mode)
        t = resize.thumbnail_plan(w, h, orientation, box=128)
        canvas = host(resizer(ops.convert_to_tensor(arr), t, out_rows=128))
        th, tw = t.out
        assert np.abs(canvas[:th, :tw].astype(int) - resize.apply_numpy(arr, t).astype(int)).max() <= 1
        assert not canvas[th:].any() and not canvas[:, tw:].any()
    if buckets:
        # One program per pair of buckets (squash and center-crop share it), whatever the sizes in it.
        model_input = {s for s in resizer.shapes if s[-1] == 48}
        assert len(model_input) == len({(resize.bucket(h), resize.bucket(w)) for w, h, _ in sizes}) == 5
    else:
        # Images come in many sizes: TensorFlow traces the resize once, for unknown shapes.
        assert resizer._fn.experimental_get_tracing_count() == 1


def test_buckets_bound_the_shapes():
    assert [resize.bucket(n) for n in (1, 64, 65, 97, 129, 193, 257, 1000, 3000)] == [
        64,
        64,
        96,
        128,
        192,
        256,
        384,
        1024,
        3072,
    ]
    sizes = range(500, 4097)
    assert len({resize.bucket(n) for n in sizes}) == 7  # 512 .. 4096, two per octave
    assert all(resize.bucket(n) >= n and resize.bucket(n) <= 1.5 * n + 1 for n in sizes)


# ----------------------------------------------------------------------------- routing


def test_routing_sends_only_plain_jpegs_to_the_device():
    base = photo((64, 48))
    forged = with_header_size(jpeg(photo((16, 16))), 9000, 9000)
    routed = {
        "baseline": jpeg(base),
        "progressive": jpeg(base, progressive=True),
        "grayscale": grayscale_jpeg(),
        "rotated": oriented_jpeg(6),
    }
    refused = {
        "empty": (b"", "empty"),
        "png": (rgba_png(), "not_jpeg"),
        "cmyk": (cmyk_jpeg(), "colour"),
        "truncated": (truncated_jpeg(), "no_eoi"),
        "forged header": (forged, "limits"),
        "text": (b"not an image" * 10, "not_jpeg"),
    }
    for name, data in routed.items():
        assert isinstance(gpu_routing.route(data, LIMIT), gpu_routing.Route), name
    for name, (data, why) in refused.items():
        assert gpu_routing.route(data, LIMIT) == why, name
    assert gpu_routing.route(jpeg(base), 64 * 48 - 1) == "limits"
    r = gpu_routing.route(oriented_jpeg(6, (90, 60)), LIMIT)
    assert (r.width, r.height, r.orientation, r.oriented) == (90, 60, 6, (60, 90))
    assert gpu_routing.jpeg_frame_marker(jpeg(base)) == 0xFFC0
    assert gpu_routing.jpeg_frame_marker(jpeg(base, progressive=True)) == 0xFFC2


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 200))
def test_the_frame_marker_scan_never_raises(noise, cut):
    data = jpeg(photo((16, 16)))
    for candidate in (noise, b"\xff\xd8" + noise, data[:cut] + noise, data[:cut]):
        marker = gpu_routing.jpeg_frame_marker(candidate)
        assert marker is None or 0xFFC0 <= marker <= 0xFFCF


# ----------------------------------------------------------------------------- decoding


def test_orientations_grayscale_progressive_and_center_crop_match_the_cpu_path():
    """Geometry and colour: against the CPU path decoding at full size (no draft), the only
    difference left is the resize's rounding (the CPU backend decodes like Pillow's libjpeg)."""
    cases = {f"orient{o}": oriented_jpeg(o) for o in range(1, 9)}
    cases["grayscale"] = grayscale_jpeg()
    cases["progressive"] = jpeg(photo((97, 71), "rocket"), progressive=True)
    cases["big"] = jpeg(photo((1200, 800), "astronaut"))
    images = [SourceImage(name, f"mem://{name}", data, meta="m", marker="size=1") for name, data in cases.items()]
    for mode in ("squash", "center-crop"):
        got, counts = decoder(32, mode).decode_counted(images)
        assert counts == {"gpu": len(images)}
        for image, row in zip(images, got, strict=True):
            expected = decode_one(image, cpu_kwargs(32, mode, draft=False))
            assert isinstance(row, DecodedImage)
            assert (row.id, row.uri, row.content_sha256, row.width, row.height, row.meta, row.marker) == (
                expected.id,
                expected.uri,
                expected.content_sha256,
                expected.width,
                expected.height,
                "m",
                "size=1",
            )
            pixels = host(row.pixels)
            assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
            assert np.abs(pixels.astype(int) - expected.pixels.astype(int)).max() <= 2, (image.id, mode)
    gray = host(got[list(cases).index("grayscale")].pixels)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_thumbnails_match_the_cpu_paths_size_and_content():
    images = [SourceImage("a", "a", oriented_jpeg(6, (300, 200))), SourceImage("b", "b", jpeg(photo((90, 60))))]
    got = decoder(32, thumbnails=True).decode(images)
    for image, row in zip(images, got, strict=True):
        expected = decode_one(image, cpu_kwargs(32, draft=False, thumbnail=True))
        mine, theirs = Image.open(io.BytesIO(row.thumbnail)), Image.open(io.BytesIO(expected.thumbnail))
        assert mine.format == "JPEG" and mine.size == theirs.size
        diff = np.abs(np.asarray(mine).astype(int) - np.asarray(theirs).astype(int))
        assert diff.mean() < 3  # two JPEG encodings of pixels one level apart


def test_decoding_into_bucket_sized_buffers_gives_the_same_pixels():
    """On JAX, images are decoded into the corner of zeroed bucket-sized buffers (no program per
    size). The same path, forced here on numpy buffers, must give what decoding alone gives."""
    images = [SourceImage(f"i{k}", "u", oriented_jpeg(k % 8 + 1, (70 + 9 * k, 50 + 5 * k))) for k in range(5)]
    plain = decoder(32).decode(images)
    canvased = decoder(32)
    canvased._canvas = ((lambda shape: np.zeros(shape, np.uint8)), (lambda: 0))
    got = canvased.decode(images)
    assert canvased._canvas is not None and canvased.last_error is None  # it did decode into them
    for a, b in zip(plain, got, strict=True):
        assert (a.width, a.height) == (b.width, b.height)
        assert np.array_equal(host(a.pixels), host(b.pixels))


class RefusingDecoder:
    """nvImageCodec's CPU decoder, except that it returns None (as nvImageCodec does for an
    image it cannot decode) for streams whose bytes are in `refuse`, or raises for the batch."""

    def __init__(self, refuse: set[bytes] = frozenset(), fail_batch: bool = False) -> None:
        nv = gpu_decode._nvimgcodec()
        self._real = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.CPU_ONLY)])
        self._refuse, self._fail = refuse, fail_batch
        self.seen = 0

    def decode(self, streams, params=None):
        self.seen += len(streams)
        if self._fail:
            raise RuntimeError("out of device memory")
        out = self._real.decode(streams, params=params)
        return [None if self._refused(s) else img for s, img in zip(streams, out, strict=True)]

    def _refused(self, stream) -> bool:
        return (stream.width, stream.height) in {(Image.open(io.BytesIO(d)).size) for d in self._refuse}


def with_header_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header claiming width x height (its scan unchanged)."""
    out = bytearray(data)
    sof = out.index(b"\xff\xc0")
    out[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


def mixed_batch() -> list[SourceImage]:
    forged = with_header_size(jpeg(photo((16, 16))), 9000, 9000)  # under the pixel limit, over the bytes
    items = {
        "good1.jpg": jpeg(photo((120, 80), "chelsea")),
        "alpha.png": rgba_png(),
        "refused.jpg": jpeg(photo((77, 55), "coffee")),
        "cmyk.jpg": cmyk_jpeg(),
        "truncated.jpg": truncated_jpeg(),
        "empty.jpg": b"",
        "forged.jpg": forged,
        "huge.jpg": with_header_size(jpeg(photo((400, 300), "rocket")), 20000, 20000),  # over LIMIT
        "text.jpg": b"hello, not an image\n" * 4,
        "good2.jpg": jpeg(photo((64, 64), "camera"), progressive=True),
    }
    return [SourceImage(name, f"mem://{name}", data) for name, data in items.items()]


def test_mixed_batch_gives_the_cpu_paths_rows_reasons_and_counts():
    images = mixed_batch()
    stub = RefusingDecoder(refuse={images[2].data})
    got, counts = decoder(32, nv_decoder=stub).decode_counted(images)
    expected = [decode_one(image, cpu_kwargs(32)) for image in images]
    assert [r.id if isinstance(r, DecodedImage) else r["id"] for r in got] == [i.id for i in images]
    for image, row, want in zip(images, got, expected, strict=True):
        if isinstance(want, dict):
            assert row == want, image.id  # same reason, message, sha256, stage
        else:
            assert isinstance(row, DecodedImage), image.id
            assert (row.content_sha256, row.width, row.height) == (want.content_sha256, want.width, want.height)
    reasons = collections.Counter(r["error"] for r in got if isinstance(r, dict))
    assert reasons == {"truncated_image": 2, "empty_file": 1, "too_many_pixels": 1, "not_an_image": 1}
    # The refused JPEG went through the CPU path alone: its pixels are the CPU path's, exactly.
    assert np.array_equal(np.asarray(got[2].pixels), expected[2].pixels)
    assert stub.seen == 3  # only good1, refused and good2 reached nvImageCodec
    assert counts["gpu"] == 2 and counts["cpu:nvimgcodec_failed"] == 1
    assert sum(counts.values()) == len(images)  # seen = on the device + on the CPU path


def test_a_batch_the_device_decoder_fails_on_still_gives_every_row():
    images = mixed_batch()
    got, counts = decoder(32, nv_decoder=RefusingDecoder(fail_batch=True)).decode_counted(images)
    expected = [decode_one(image, cpu_kwargs(32)) for image in images]
    assert counts["gpu"] == 0 and counts["cpu:nvimgcodec_failed"] == 3
    for row, want in zip(got, expected, strict=True):
        if isinstance(want, dict):
            assert row == want
        else:
            assert np.array_equal(np.asarray(row.pixels), want.pixels)


def test_without_a_gpu_the_status_says_why_and_device_gpu_refuses_in_one_line():
    available, why = gpu_decode.gpu_decode_status()
    if available:
        pytest.skip(f"a GPU decoder is available here: {why}")
    assert why and "\n" not in why
    with pytest.raises(RuntimeError, match="not possible here") as info:
        gpu_decode.BatchDecoder(size=32, max_pixels=LIMIT, device="gpu")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- with the model


@pytest.fixture(scope="module")
def photos_2_to_8_mp() -> list[bytes]:
    """Real photos enlarged to 2-8 MP JPEGs, as tests/test_closeness.py makes them."""
    rng = np.random.default_rng(3)
    return [jpeg(variant(img, rng, float(rng.uniform(2, 8))), quality=90) for img in photos().values()]


@pytest.mark.slow
def test_vectors_from_the_gpu_path_meet_the_closeness_bound(photos_2_to_8_mp):
    """Against the CPU path as it runs (draft mode), on real photos: each image's nearest CPU
    vector is its own and the relative error is <= 0.05 (tests/test_closeness.py's metric)."""
    from test_closeness import assert_close

    from pipeline.config import ModelConfig
    from pipeline.embed import stack_pixels
    from pipeline.model import CompiledModel

    images = [SourceImage(f"p{i}", f"p{i}", d) for i, d in enumerate(photos_2_to_8_mp)]
    model = CompiledModel(ModelConfig(weights="random", image_size=224), batch_size=len(images))
    got, counts = decoder(224).decode_counted(images)
    assert counts == {"gpu": len(images)}
    fast = model(stack_pixels([row.pixels for row in got]))  # device tensors, stacked where they are
    cpu = model(np.stack([decode_one(i, cpu_kwargs(224)).pixels for i in images]))
    error = assert_close(fast, cpu)
    full = model(np.stack([decode_one(i, cpu_kwargs(224, draft=False)).pixels for i in images]))
    assert error <= 0.05 and assert_close(fast, full) <= 0.05


def test_the_model_takes_a_device_batch_as_it_takes_numpy():
    import tensorflow as tf

    from pipeline.config import ModelConfig
    from pipeline.model import CompiledModel

    model = CompiledModel(ModelConfig(weights="random", image_size=32), batch_size=4)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    traced, fed = model._fn, []
    model._fn = lambda x: fed.append(type(x).__name__) or traced(x)  # observe what reaches the graph
    on_device = model(tf.constant(pixels))  # a partial batch: padded where it is, not via numpy
    assert fed == ["EagerTensor"]
    assert on_device.shape == (3, 2048) and on_device.dtype == np.float32
    np.testing.assert_allclose(on_device, model(pixels), rtol=1e-5, atol=1e-6)
    model._fn = traced
    assert model.trace_count() == 1


def _save_vector(row: dict, folder: str, tag: str) -> str:
    np.save(f"{folder}/{tag}-{row['id']}.npy", np.asarray(row["embedding"]))
    return row["id"]


def test_embed_stacks_device_pixels_on_the_device_and_numpy_as_before():
    import tensorflow as tf

    from pipeline.embed import stack_pixels

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    plain = stack_pixels(arrays)
    assert isinstance(plain, np.ndarray) and np.array_equal(plain, np.stack(arrays))
    mixed = stack_pixels([tf.constant(arrays[0]), arrays[1], tf.constant(arrays[2])])  # a CPU fallback among them
    assert isinstance(mixed, tf.Tensor) and np.array_equal(mixed.numpy(), plain)


@pytest.mark.slow
def test_beam_pipeline_with_gpu_decode_gives_every_row_and_the_cpu_paths_vectors(tmp_path):
    """FnApiRunner: DecodeImages(decode="gpu") on the CPU backend, then EmbedImages on the
    device tensors it emits. Every input is a row; ids, reasons and counts equal decode="cpu"
    (full decode, so that vectors differ only by the resize's rounding)."""
    import datetime

    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.config import ModelConfig
    from pipeline.decode import DecodeImages
    from pipeline.embed import EmbedImages

    images = mixed_batch() + [SourceImage(f"more{i}.jpg", f"m{i}", jpeg(photo((50 + i, 40)))) for i in range(7)]
    cfg = ModelConfig(weights="random", image_size=32)
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cpu_rows = [decode_one(i, cpu_kwargs(32)) for i in images]
    expected_errors = sorted((r["id"], r["error"]) for r in cpu_rows if isinstance(r, dict))
    ok = sorted(r.id for r in cpu_rows if isinstance(r, DecodedImage))
    assert len(ok) == 12 and len(expected_errors) == 5

    p = beam.Pipeline(runner="FnApiRunner")
    source = p | beam.Create(images)
    for tag in ("gpu", "cpu"):
        decoded = source | f"Decode{tag}" >> DecodeImages(
            size=32, max_pixels=LIMIT, draft=False, decode=tag, batch_size=3, threads=2, cpu_backend_ok=True
        )
        embedded = decoded.decoded | f"Embed{tag}" >> EmbedImages(cfg, batch_size=4, embedded_at=when)
        ids = embedded.embeddings | f"Save{tag}" >> beam.Map(_save_vector, str(tmp_path), tag)
        errors = (decoded.errors, embedded.errors) | f"Errors{tag}" >> beam.Flatten()
        reasons = errors | f"Reason{tag}" >> beam.Map(lambda r: (r["id"], r["error"]))
        assert_that(ids, equal_to(ok), label=f"Embedded{tag}")
        assert_that(reasons, equal_to(expected_errors), label=f"Errors{tag}")
    result = p.run()
    result.wait_until_finish()

    def counter(name: str) -> int:
        found = result.metrics().query(MetricsFilter().with_name(name))["counters"]
        return sum(c.committed for c in found)

    # Every image the gpu branch saw was decoded once: on the device or on the CPU path.
    assert counter("images_decoded_gpu") == 10  # good1, refused (no stub here), good2 and the 7 more
    assert counter("images_decoded_gpu") + counter("images_decoded_cpu_fallback") == len(images)
    for name in ok:
        gpu, cpu = np.load(tmp_path / f"gpu-{name}.npy"), np.load(tmp_path / f"cpu-{name}.npy")
        assert np.linalg.norm(gpu - cpu) <= 0.05 * np.linalg.norm(cpu), name
