"""Path rules that need no I/O library: which names are images, what is a glob, an input's root.

Plain functions over strings (and, for local paths, `os.path`), so that the input spec, the
command line and the readers share one definition without importing Beam.
"""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
GLOB_CHARS = "*?["


def is_image_path(path: str) -> bool:
    """True for the image extensions we embed (case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def is_glob(path: str) -> bool:
    """True when `path` has a wildcard in it."""
    return any(c in path for c in GLOB_CHARS)


def resolve_input(spec: str) -> tuple[str, str]:
    """(root, glob pattern) for a directory or a glob; ids are paths relative to root."""
    spec = spec.rstrip("/") if len(spec) > 1 else spec
    if is_glob(spec):
        cut = min(spec.index(c) for c in GLOB_CHARS if c in spec)
        root = spec[:cut].rsplit("/", 1)[0] if "/" in spec[:cut] else ""
        return root, spec
    if _is_single_file(spec):
        return spec.rsplit("/", 1)[0] if "/" in spec else "", spec
    return spec, f"{spec}/**"


def _is_single_file(spec: str) -> bool:
    if "://" not in spec:
        # lexists: a broken link or a FIFO named as the input is one file (one row), not a folder.
        return os.path.lexists(spec) and not os.path.isdir(spec)
    return is_image_path(spec)
