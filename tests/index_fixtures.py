"""Small index directories for the search side's tests, written with FAISS directly, and embeddings datasets.

They follow the index directory contract of docs/ARCHITECTURE.md (index.faiss, ids.parquet,
index.json) so the Searcher tests do not depend on the index build code; the end
to end test uses the real `build_index`. `write_embeddings` writes made-up vectors
as `embedpipe embed` would, for the index build's tests.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import io
import json
import os
import pathlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from PIL import Image

from pipeline.config import ModelConfig
from pipeline.imaging import decode_image
from pipeline.records import embeddings_schema
from pipeline.sample import jpeg_bytes, photos
from pipeline.storage import mkdirs, write_json_atomic

SYNTHETIC_MODEL = "synthetic/test-vectors"


def clustered(n: int, dim: int, *, clusters: int = 8, spread: float = 0.15, seed: int = 0) -> np.ndarray:
    """Seeded float32 vectors around `clusters` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    which = rng.integers(0, clusters, n)
    return (centres[which] + spread * rng.standard_normal((n, dim))).astype(np.float32)


def swatch_jpeg(label: int, size: int = 40) -> bytes:
    """A small distinct JPEG (the thumbnail of synthetic item `label`)."""
    rng = np.random.default_rng(label)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    return jpeg_bytes(Image.new("RGB", (size, size + label % 7), colour), quality=85)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force (scores, labels) in numpy: cosine similarity or Euclidean distance."""
    if metric == "cosine":
        base = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        sims = q @ base.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, order, axis=1), order
    dists = np.sqrt(((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(-1))
    order = np.argsort(dists, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dists, order, axis=1), order


def write_index_dir(
    out: str | os.PathLike,
    vectors: np.ndarray,
    *,
    ids: list[str] | None = None,
    uris: list[str] | None = None,
    factory: str = "Flat",
    metric: str = "cosine",
    model: str = SYNTHETIC_MODEL,
    model_config: dict | None = None,
    thumbnails: list[bytes | None] | None = None,
    search_params: dict | None = None,
    row_group_size: int = 4096,
    seed: int = 0,
) -> str:
    """Write INDEX_DIR/{index.faiss, ids.parquet, index.json} for these vectors and return the directory."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n, dim = vectors.shape
    ids = ids or [f"item-{i:05d}" for i in range(n)]
    uris = uris or [f"file:///corpus/{i}" for i in ids]
    x = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    if metric == "cosine":
        faiss.normalize_L2(x)
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    index = faiss.index_factory(dim, factory, faiss_metric)
    needs_training = not index.is_trained
    if needs_training:
        rng = np.random.default_rng(seed)
        index.train(x[rng.permutation(n)])
    index.add(x)
    space = faiss.ParameterSpace()
    for name, value in (search_params or {}).items():
        space.set_index_parameter(index, name, value)
    faiss.write_index(index, str(out / "index.faiss"))

    columns = {
        "label": pa.array(np.arange(n, dtype=np.int64)),
        "id": pa.array(ids, pa.string()),
        "uri": pa.array(uris, pa.string()),
    }
    if thumbnails is not None:
        columns["thumbnail"] = pa.array(thumbnails, pa.binary())
    pq.write_table(pa.table(columns), out / "ids.parquet", row_group_size=row_group_size)

    queries = x[: min(n, 50)]
    _, truth = faiss.knn(queries, x, min(10, n), metric=faiss_metric)
    _, found = index.search(queries, min(10, n))
    recall = float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(truth, found)]))
    meta = {
        "format_version": 1,
        "factory": factory,
        "index_type": factory.lower(),
        "metric": metric,
        "normalized": metric == "cosine",
        "dim": dim,
        "ntotal": n,
        "model": model,
        "model_config": model_config,
        "source": "tests/index_fixtures.py",
        "built_at": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc).isoformat(),
        "build_seconds": 0.5,
        "train_size": n if needs_training else 0,
        "search_params": search_params or {},
        "recall_at_10": recall,
        "recall_queries": len(queries),
        "bytes": (out / "index.faiss").stat().st_size,
        "has_thumbnails": thumbnails is not None,
        "embedpipe_version": "test",
    }
    (out / "index.json").write_text(json.dumps(meta, indent=2))
    return str(out)


def write_embeddings(
    output: str,
    vectors: np.ndarray,
    *,
    model: str,
    ids: list[str] | None = None,
    files: int = 1,
    thumbnails: list[bytes] | None = None,
    model_config: dict | None = None,
) -> str:
    """Write vectors as an embeddings dataset (OUTPUT/embeddings/part-*.parquet + manifest.json).

    The same schema `embedpipe embed` writes, for vectors made up by a test.
    Returns OUTPUT.
    """
    out = output.rstrip("/")
    n, dim = vectors.shape
    ids = ids if ids is not None else [f"img-{i:08d}.jpg" for i in range(n)]
    schema = embeddings_schema(dim, thumbnails=thumbnails is not None)
    mkdirs(f"{out}/embeddings")
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        a, b = bounds[f], bounds[f + 1]
        columns = {
            "id": ids[a:b],
            "uri": [f"file:///corpus/{i}" for i in ids[a:b]],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors[a:b].reshape(-1), pa.float32()), dim),
            "content_sha256": ["0" * 64] * (b - a),
            "width": pa.array([640] * (b - a), pa.int32()),
            "height": pa.array([480] * (b - a), pa.int32()),
            "model": [model] * (b - a),
            "embedded_at": pa.array([now] * (b - a), pa.timestamp("us", tz="UTC")),
        }
        if thumbnails is not None:
            columns["thumbnail"] = thumbnails[a:b]
        for field in schema:  # optional columns this writer has no values for (e.g. source_marker)
            if field.name not in columns and field.nullable:
                columns[field.name] = pa.nulls(b - a, field.type)
        table = pa.Table.from_pydict(columns, schema=schema)
        with FileSystems.create(f"{out}/embeddings/part-{f:05d}-of-{files:05d}.parquet") as handle:
            pq.write_table(table, handle, row_group_size=2048)
    write_json_atomic(f"{out}/manifest.json", {"model": model, "model_config": model_config, "embedding_dim": dim})
    return out


def model_config_dict(cfg: ModelConfig) -> dict:
    """index.json's model_config for a ModelConfig (the fields the embed manifest records)."""
    return cfg.to_record()


def photo_files(folder: str | os.PathLike, *, max_side: int = 160, quality: int = 90) -> dict[str, str]:
    """The bundled sample photos, scaled down and written as JPEGs: id -> path."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, img in sorted(photos().items()):
        small = img.copy()
        small.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        path = folder / f"{name}.jpg"
        path.write_bytes(jpeg_bytes(small, quality=quality))
        out[f"{name}.jpg"] = str(path)
    return out


def photo_index(
    out: str | os.PathLike, files: dict[str, str], cfg: ModelConfig, *, factory: str = "Flat", row_group_size: int = 5
) -> str:
    """An index of real photos embedded with `cfg`, decoded as `embedpipe embed --thumbnails` does."""
    from pipeline.model import CompiledModel

    pixels, thumbs = [], []
    for path in files.values():
        data = pathlib.Path(path).read_bytes()
        px, _, _, thumb = decode_image(
            data, size=cfg.image_size, resize=cfg.resize, max_pixels=10**8, draft=True, thumbnail=True
        )
        pixels.append(px)
        thumbs.append(thumb)
    model = CompiledModel(cfg, 4)
    batch = np.stack(pixels)
    vectors = np.concatenate([model(batch[i : i + 4]) for i in range(0, len(batch), 4)])
    return write_index_dir(
        out,
        vectors,
        ids=list(files),
        uris=[pathlib.Path(p).resolve().as_uri() for p in files.values()],
        factory=factory,
        model=cfg.fingerprint(),
        model_config=model_config_dict(cfg),
        thumbnails=thumbs,
        row_group_size=row_group_size,
    )


_SHARED: dict[int, tuple[str, dict[str, str]]] = {}


def shared_photo_index(image_size: int = 32) -> tuple[str, dict[str, str]]:
    """(index dir, id -> image path) of the sample photos, built once per test process and size.

    Several test modules search the same small photo index; building it costs a
    model build, so they share one (read-only) copy.
    """
    if image_size not in _SHARED:
        base = pathlib.Path(tempfile.mkdtemp(prefix="embedpipe-photo-index-"))
        atexit.register(shutil.rmtree, base, True)
        files = photo_files(base / "images")
        cfg = ModelConfig(image_size=image_size, weights="random", seed=0)
        _SHARED[image_size] = (photo_index(base / "index", files, cfg), files)
    return _SHARED[image_size]


def png_bytes(img: Image.Image) -> bytes:
    """Encode as PNG."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class FakeRemoteFileSystem(LocalFileSystem):
    """`fakeremote://ROOT-RELATIVE/PATH` served from a local folder: a stand-in for gs:// in tests.

    Only the boundary is faked: callers go through Beam's FileSystems exactly as
    they would for gs://. Set `FakeRemoteFileSystem.root` before use.
    """

    root = "/nonexistent"

    @classmethod
    def scheme(cls) -> str:
        return "fakeremote"

    def _local(self, path: str) -> str:
        prefix = "fakeremote://"
        assert path.startswith(prefix), path
        return os.path.join(self.root, path[len(prefix) :])

    def join(self, basepath: str, *paths: str) -> str:
        return "/".join([basepath.rstrip("/"), *paths])

    def exists(self, path: str) -> bool:
        return super().exists(self._local(path))

    def open(self, path: str, mime_type: str = "application/octet-stream", compression_type: str = "auto"):
        return super().open(self._local(path), mime_type, compression_type)

    def create(self, path: str, mime_type: str = "application/octet-stream", compression_type: str = "auto"):
        return super().create(self._local(path), mime_type, compression_type)

    def mkdirs(self, path: str) -> None:
        os.makedirs(self._local(path), exist_ok=True)


@contextlib.contextmanager
def _running(server) -> Iterator[str]:
    """Run a uvicorn server in a thread on a free loopback port; yields its base URL, stops it after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # port 0: the kernel picks a free one, no race with other tests
    sock.listen(64)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run an ASGI app under a real uvicorn server on a free loopback port; yields its base URL."""
    import uvicorn

    # log_config=None: uvicorn's own dictConfig would close every logging handler of the test process,
    # absl's among them, which closes the stream it was given (pytest's capture, when absl was first
    # imported under it) and breaks that test's output capture.
    config = uvicorn.Config(app, log_level="warning", log_config=None, timeout_graceful_shutdown=2)
    with _running(uvicorn.Server(config)) as url:
        yield url


def model_index_dir(
    out: str | os.PathLike, n: int = 24, *, image_size: int = 32, weights: str = "random", model: str | None = None
) -> str:
    """A synthetic index whose index.json names a rebuildable model, so image queries work without embedding a corpus.

    The vectors are seeded random ones, not the model's: search by image works (any
    query finds some neighbours) at no cost but the model build of whoever serves it.
    `model` overrides the recorded fingerprint (for weights that cannot be fingerprinted).
    """
    cfg = ModelConfig(image_size=image_size, weights=weights, seed=0)
    fingerprint = model if model is not None else cfg.fingerprint()
    vectors = clustered(n, 2048)
    return write_index_dir(out, vectors, model=fingerprint, model_config=model_config_dict(cfg))


@contextlib.contextmanager
def serve_guarded_in_thread(app, guard) -> Iterator[str]:
    """Like serve_in_thread, under the server `embedpipe serve` runs: `guard` (a ConnectionGuard) limits it."""
    from pipeline.serve.connections import build_server

    with _running(build_server(app, guard, log_level="warning")) as url:
        yield url
