"""A sample corpus made on the spot from real photos that ship inside scikit-image.

No network and no account: the photos are files of the installed `skimage`
package (astronaut, coffee, chelsea the cat, ...). Variants (crops, flips,
scales, JPEG re-compression) give a corpus of any size with real-photo content.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pathlib

import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "camera.png",
)


def photo_dir() -> pathlib.Path:
    """Folder of scikit-image's bundled photos (found without importing skimage)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed; `pip install -r requirements.txt` brings it")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"


def photos() -> dict[str, Image.Image]:
    """name -> RGB image for every bundled photo found."""
    base = photo_dir()
    out = {}
    for name in PHOTOS:
        path = base / name
        if path.exists():
            with Image.open(path) as img:
                out[pathlib.Path(name).stem] = img.convert("RGB")
    if not out:
        raise RuntimeError(f"no sample photos found under {base}")
    return out


def variant(img: Image.Image, rng: np.random.Generator, megapixels: float | None = None) -> Image.Image:
    """A random crop / flip / colour jitter of a photo, optionally scaled to about `megapixels`."""
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.8, 1.2, size=3)
    arr = np.clip(np.asarray(out, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
    out = Image.fromarray(arr)
    if megapixels:
        scale = (megapixels * 1e6 / (out.width * out.height)) ** 0.5
        out = out.resize(
            (max(1, round(out.width * scale)), max(1, round(out.height * scale))), Image.Resampling.BICUBIC
        )
    return out


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    """Encode as JPEG."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_corpus(
    folder: str | os.PathLike,
    *,
    count: int = 24,
    megapixels: tuple[float, float] | None = None,
    seed: int = 0,
    with_bad: bool = True,
) -> list[str]:
    """Write `count` JPEG variants of the bundled photos (plus a few bad files) and return their paths."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = photos()
    names = sorted(base)
    paths = []
    for i in range(count):
        name = names[i % len(names)]
        mp = float(rng.uniform(*megapixels)) if megapixels else None
        img = base[name] if i < len(names) and not megapixels else variant(base[name], rng, mp)
        sub = folder / name
        sub.mkdir(exist_ok=True)
        path = sub / f"{name}_{i:04d}.jpg"
        path.write_bytes(jpeg_bytes(img, quality=int(rng.integers(80, 96))))
        paths.append(str(path))
    if with_bad:
        bad = folder / "bad"
        bad.mkdir(exist_ok=True)
        (bad / "empty.jpg").write_bytes(b"")
        (bad / "not_an_image.jpg").write_text("this is a text file, not a JPEG\n")
        truncated = jpeg_bytes(base[names[0]])
        (bad / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
        paths += [str(bad / n) for n in ("empty.jpg", "not_an_image.jpg", "truncated.jpg")]
    return paths
