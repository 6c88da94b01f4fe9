"""Opening an index directory: local or remote (copied to a temporary directory), the checks of
index.json, and reading index.faiss, memory-mapped where the index type allows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import faiss
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import UsageError

FORMAT_VERSION = 1
INDEX_FILES = ("index.json", "index.faiss", "ids.parquet")


class IndexFormatError(UsageError):
    """The directory is not a readable index (missing file, wrong version, inconsistent parts)."""


def localise(index_dir: str) -> tuple[str, str | None]:
    """(local directory with the index files, temp dir to delete on close or None)."""
    if FileSystems.get_scheme(index_dir) is None:
        if not os.path.isdir(index_dir):
            raise IndexFormatError(f"no index directory at {index_dir!r} (build one with `embedpipe index`)")
        return index_dir, None
    base = index_dir.rstrip("/")
    tmp = tempfile.mkdtemp(prefix="embedpipe-index-")
    try:
        for name in INDEX_FILES:
            src = f"{base}/{name}"
            if not FileSystems.exists(src):
                raise IndexFormatError(f"{src} does not exist: is {base} the output of `embedpipe index`?")
            # FAISS and the memory map need a local file; copy in chunks, never whole in memory.
            with (
                FileSystems.open(src, compression_type="uncompressed") as handle,
                open(os.path.join(tmp, name), "wb") as out,
            ):
                shutil.copyfileobj(handle, out, 16 << 20)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, tmp


def read_meta(path: str) -> dict:
    if not os.path.exists(path):
        raise IndexFormatError(f"{path} is missing: is this the output of `embedpipe index`?")
    with open(path, encoding="utf-8") as handle:
        meta = json.load(handle)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path} has format_version {version!r}; this embedpipe reads version {FORMAT_VERSION}. "
            "Rebuild the index with this version, or use the embedpipe that built it."
        )
    missing = [key for key in ("metric", "dim", "ntotal", "model") if key not in meta]
    if missing or meta["metric"] not in ("cosine", "l2"):
        raise IndexFormatError(f"{path} lacks {missing} or has an unknown metric {meta.get('metric')!r}")
    if (meta["metric"], faiss_metric_of(meta)) not in (("cosine", "inner_product"), ("cosine", "l2"), ("l2", "l2")):
        raise IndexFormatError(
            f"{path}: metric {meta['metric']!r} cannot be searched with faiss_metric {meta['faiss_metric']!r}"
        )
    return meta


def faiss_metric_of(meta: dict) -> str:
    """How index.faiss compares vectors: "inner_product" or "l2" (indexes built before the field: by metric)."""
    return meta.get("faiss_metric") or ("inner_product" if meta["metric"] == "cosine" else "l2")


def drop_precomputed_table(index: faiss.Index) -> None:
    """Free FAISS's precomputed table of an L2 IVF-PQ index (and stop it being built again).

    FAISS builds nlist x M x 1 KiB of it after training and after every read_index (0.88 GB for
    3,360 lists of PQ256, more than the codes of 2M vectors), to save work per probed list. In our
    measurement (PQ256, nprobe 8, one thread) search was no faster with it, and the memory budget
    is about the index, so it is dropped.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQ) and ivf.use_precomputed_table != -1:
        ivf.use_precomputed_table = -1
        ivf.precompute_table()


def read_index(path: str, *, mmap: bool) -> tuple[faiss.Index, bool]:
    """(index, memory-mapped?): flat codes map with IO_FLAG_MMAP_IFC, inverted lists with IO_FLAG_MMAP."""
    if not os.path.exists(path):
        raise IndexFormatError(f"{path} is missing: is this the output of `embedpipe index`?")
    if mmap:
        for flag in (faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP):
            try:
                return faiss.read_index(path, flag), True
            except RuntimeError:  # this index type cannot be mapped with this flag: try the next
                continue
    try:
        return faiss.read_index(path), False
    except RuntimeError as exc:
        raise IndexFormatError(f"{path} is not a FAISS index: {exc}") from exc
