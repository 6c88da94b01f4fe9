"""decode_image: every odd-but-valid input is embedded correctly, every bad one has a reason."""

from __future__ import annotations

import numpy as np
import pytest
from odd_images import (
    BAD,
    animated_gif,
    cmyk_jpeg,
    encode,
    exif_rotated_jpeg,
    grayscale_jpeg,
    one_pixel_png,
    palette_png_with_transparency,
    photo,
    pixel_bomb_png,
    png16_gray,
    rgba_png,
)

from pipeline.imaging import DecodeError, decode_image

LIMIT = 100_000_000


def decode(data: bytes, size: int = 32, **kw):
    kw.setdefault("max_pixels", LIMIT)
    return decode_image(data, size=size, **kw)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_raise_with_reason(name):
    build, reason = BAD[name]
    with pytest.raises(DecodeError) as info:
        decode(build())
    assert info.value.reason == reason
    assert str(info.value)  # a readable message, not just a code


def test_pixel_limit_is_configurable():
    data = encode(photo((100, 100)), "PNG")
    pixels, *_ = decode(data, max_pixels=10_000)
    assert pixels.shape == (32, 32, 3)
    with pytest.raises(DecodeError) as info:
        decode(data, max_pixels=9_999)
    assert info.value.reason == "too_many_pixels"
    assert "10,000" in str(info.value)


def test_bomb_is_refused_before_decoding():
    # 900 MP claimed by a file of a few hundred KB: refused from the header alone.
    data = pixel_bomb_png()
    assert len(data) < 2_000_000
    with pytest.raises(DecodeError, match="900,000,000 pixels"):
        decode(data)


def test_grayscale_becomes_rgb_with_equal_channels():
    pixels, w, h, _ = decode(grayscale_jpeg())
    assert (w, h) == (64, 48)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


def test_cmyk_jpeg_converts_to_rgb_close_to_the_original():
    pixels, *_ = decode(cmyk_jpeg(), size=32)
    reference = np.asarray(photo((80, 60)).resize((32, 32)), dtype=np.float32)
    assert np.abs(pixels.astype(np.float32) - reference).mean() < 20


def test_16bit_png_is_scaled_not_clipped():
    pixels, *_ = decode(png16_gray(40000))
    assert pixels.shape == (32, 32, 3)
    assert abs(int(pixels[0, 0, 0]) - 40000 // 257) <= 1  # 155, not 255


def test_palette_transparency_composites_over_white():
    pixels, *_ = decode(palette_png_with_transparency(), size=40)
    assert tuple(pixels[5, 5]) == (255, 255, 255)  # transparent half: white, not black
    assert tuple(pixels[5, 35]) == (0, 255, 0)


def test_rgba_composites_over_white():
    pixels, *_ = decode(rgba_png(), size=40)
    r, g, b = (int(v) for v in pixels[10, 10])
    assert abs(r - (200 * 128 + 255 * 127) / 255) <= 2 and abs(g - 127) <= 2 and abs(b - 127) <= 2


def test_animated_gif_uses_first_frame():
    pixels, *_ = decode(animated_gif(), size=40)
    r, _g, b = (int(v) for v in pixels[20, 20])
    assert r > 200 and b < 50


def test_exif_rotation_is_applied():
    pixels, w, h, _ = decode(exif_rotated_jpeg(), size=60, resize="squash")
    assert (w, h) == (30, 60)  # oriented size
    # Rotated 90 degrees clockwise: the left (red) half is now on top.
    top, bottom = pixels[5, 30].astype(int), pixels[55, 30].astype(int)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_one_pixel_image_is_upscaled():
    pixels, w, h, _ = decode(one_pixel_png())
    assert (w, h) == (1, 1)
    assert np.all(pixels == np.array([10, 200, 30], np.uint8))


def test_exact_size_png_is_not_resampled():
    img = photo((64, 64))
    pixels, *_ = decode(encode(img, "PNG"), size=64)
    assert np.array_equal(pixels, np.asarray(img))


def test_center_crop_keeps_the_middle_and_squash_keeps_everything():
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)  # left third red
    arr[:, 32:64] = (0, 255, 0)  # middle green
    arr[:, 64:] = (0, 0, 255)  # right third blue
    data = encode(__import__("PIL.Image").Image.fromarray(arr), "PNG")
    crop, *_ = decode(data, size=32, resize="center-crop")
    assert np.all(crop[:, 4:28, 1] > 200) and crop[:, 4:28, 0].max() < 50
    squash, *_ = decode(data, size=32, resize="squash")
    assert squash[16, 2, 0] > 200 and squash[16, 30, 2] > 200


def test_draft_mode_stays_close_to_full_decode():
    img = photo((2000, 1500), "chelsea")
    data = encode(img, "JPEG", quality=92)
    fast, *_ = decode(data, size=224, draft=True)
    full, *_ = decode(data, size=224, draft=False)
    diff = np.abs(fast.astype(np.int16) - full.astype(np.int16))
    assert diff.mean() < 3.0


def test_thumbnail_is_a_small_jpeg():
    _, _, _, thumb = decode(encode(photo((400, 300)), "JPEG"), thumbnail=True)
    assert thumb[:2] == b"\xff\xd8"
    import io

    from PIL import Image

    with Image.open(io.BytesIO(thumb)) as t:
        assert max(t.size) == 128


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_every_exif_orientation_matches_pillows_exif_transpose(orientation, fmt):
    import io

    from PIL import Image, ImageOps

    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:10, :20] = (255, 0, 0)  # a marked corner, so every flip/rotation is visible
    arr[20:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(arr), fmt, **({"quality": 95} if fmt == "JPEG" else {}), exif=exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    pixels, w, h, _ = decode(data, size=32, draft=False)
    assert (w, h) == expected.size
    reference = np.asarray(expected.resize((32, 32), Image.Resampling.BILINEAR, reducing_gap=3.0))
    assert np.abs(pixels.astype(int) - reference.astype(int)).max() <= 1


def test_decode_pool_gives_every_row_with_many_threads():
    """DecodeImages on a real runner with 1 and 4 decode threads: every image is decoded
    exactly as decode_one does it, every bad one is an error row, none lost or repeated."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.decode import DecodeImages, decode_one
    from pipeline.records import SourceImage

    def source(i: int) -> SourceImage:
        data = photo((40 + i, 30)).tobytes() if i % 5 == 0 else encode(photo((40 + i, 30 + i)), "PNG")
        return SourceImage(f"img{i:02d}", f"mem://img{i:02d}", data)

    sources = [source(i) for i in range(23)]
    kwargs = dict(size=16, resize="squash", max_pixels=LIMIT, draft=True, thumbnail=False)
    expected = [decode_one(s, kwargs) for s in sources]
    ok = [(d.id, d.content_sha256, d.pixels.tobytes()) for d in expected if not isinstance(d, dict)]
    bad = [(r["id"], r["error"]) for r in expected if isinstance(r, dict)]
    assert len(ok) == 18 and len(bad) == 5 and {e for _, e in bad} == {"not_an_image"}
    for threads in (1, 4):
        with beam.Pipeline(runner="FnApiRunner") as p:
            decoded = p | beam.Create(sources) | DecodeImages(size=16, max_pixels=LIMIT, threads=threads)
            got_ok = decoded.decoded | "Ok" >> beam.Map(lambda d: (d.id, d.content_sha256, d.pixels.tobytes()))
            got_bad = decoded.errors | "Bad" >> beam.Map(lambda r: (r["id"], r["error"]))
            assert_that(got_ok, equal_to(ok), label="AllDecoded")
            assert_that(got_bad, equal_to(bad), label="AllErrors")


def test_decode_threads_run_at_lower_priority():
    import os
    import threading

    from pipeline.decode import DECODE_NICENESS, decode_pool

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = decode_pool(3).submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert seen == min(19, base + DECODE_NICENESS)


def test_a_forked_child_gets_its_own_decode_pool():
    import multiprocessing

    from pipeline.decode import decode_pool

    assert decode_pool(2).submit(lambda: 7).result() == 7  # the parent's pool has threads now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as child:
        assert child.apply_async(_submit_in_pool).get(timeout=30) == 7


def _submit_in_pool() -> int:
    from pipeline.decode import decode_pool

    return decode_pool(2).submit(lambda: 7).result(timeout=10)
