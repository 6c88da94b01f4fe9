"""Options of the embedding job and of the index, declared once and passed down to every stage.

The dataclasses are plain data (picklable, hashable) so that Beam can ship them to
workers and so that a worker-wide model cache can be keyed on them.
"""

from __future__ import annotations

import dataclasses
import hashlib

from pipeline.applications import (
    APPLICATIONS,
    DEFAULT_MODEL,
    PREPROCESS_CHOICES,
    Application,
    check_model_name,
    is_saved_model,
)
from pipeline.errors import WeightsUnavailableError
from pipeline.index.auto import parse_memory_budget
from pipeline.inputs import InputSpec
from pipeline.model_files import missing_weights_message

POOLINGS = ("avg", "max")
RESIZE_MODES = ("squash", "center-crop")
PRECISIONS = ("fp32", "bf16", "fp16")
DECODERS = ("auto", "cpu", "gpu")
DECODE_STAGES = ("fused", "separate")
INDEX_METRICS = ("cosine", "l2")
# Measured: on CPU, batches beyond 32 gain nothing and hold more memory; a GPU
# needs a few hundred images in flight to stay busy (docs/GPU.md).
CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 128
DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: bigger than any camera, smaller than a bomb
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # image files (and records) above this are refused

# md5 that Keras itself checks for resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5;
# it identifies the ImageNet weights without reading (or importing) anything.
IMAGENET_NOTOP_MD5 = APPLICATIONS["resnet50"].weights_hash


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """ValueError unless `value` is one of `choices` (the message names the option and every choice)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the vector an image gets.

    `model` is a Keras application (pipeline/applications.py: cut with include_top=False, its own
    preprocessing inside the graph) or the path of a saved `.keras` model, cut at `layer`. Two runs
    with equal `ModelConfig` (and equal weights bytes) produce identical embeddings; `fingerprint()`
    names that identity. A weights file or saved model is named by its sha256: `resolve()` hashes
    it once, in the driver, and the config carries the digest to every worker, so nothing
    downstream reads the file to name it. For a saved model `resolve()` also reads the input size,
    the vector width and the full path of the layer from the file (pipeline/saved_model.py).
    """

    # None: the model's own: an application's default size; a saved model's input size (224 where it is unsized).
    image_size: int | None = None
    pooling: str = "avg"
    # "imagenet", "random" or a path to a weights file; None: "imagenet" for an application. A saved
    # model holds its own weights and takes none.
    weights: str | None = None
    seed: int = 0  # only used by weights="random"
    resize: str = "squash"
    precision: str = "fp32"
    # XLA: None = auto (pipeline.model.use_xla: on for full-size inputs on CPU workers,
    # off on GPUs). Not part of the fingerprint: it changes speed, not vectors
    # (max relative difference 2e-7 on CPU).
    jit: bool | None = None
    # sha256 of a weights file given by path, set by resolve(); None for imagenet and random.
    weights_sha256: str | None = None
    model: str = DEFAULT_MODEL  # an application name (APPLICATIONS) or the path of a .keras file
    layer: str | None = None  # a saved model's layer to cut at (None: its output); resolve() writes its full path
    preprocess: str = "none"  # a saved model's input: 0-255 RGB as is, or an application's preprocess_input first
    model_sha256: str | None = None  # sha256 of a saved model's file, set by resolve()
    dim: int | None = None  # the vector width: an application's from its table row, a saved model's from resolve()

    def __post_init__(self) -> None:
        check_model_name(self.model)
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("resize", self.resize, RESIZE_MODES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("preprocess", self.preprocess, PREPROCESS_CHOICES)
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1; got {self.image_size}")
        if is_saved_model(self.model):
            self._check_saved()
            return
        app = APPLICATIONS[self.model]
        if self.layer is not None:
            raise ValueError(
                f"--layer picks a layer of a saved model (--model PATH.keras); {self.model} is cut where Keras "
                "cuts it (include_top=False) and pooled by --pooling"
            )
        if self.preprocess != "none":
            raise ValueError(
                f"--preprocess applies to a saved model (--model PATH.keras); {self.model} always applies its own"
            )
        # Filled in here, so that every config of an application names its size, weights and width.
        object.__setattr__(self, "weights", "imagenet" if self.weights is None else self.weights)
        object.__setattr__(self, "image_size", app.default_size if self.image_size is None else self.image_size)
        if self.image_size < app.min_size:
            raise ValueError(
                f"image_size must be >= {app.min_size} ({self.model} downsamples {app.min_size}x); "
                f"got {self.image_size}"
            )
        if self.dim not in (None, app.dim):
            raise ValueError(f"{self.model} gives {app.dim}-d vectors; dim={self.dim} cannot be")
        object.__setattr__(self, "dim", app.dim)

    def _check_saved(self) -> None:
        if self.weights is not None:
            raise ValueError(
                f"--weights does not apply to a saved model: {self.model} holds its own weights "
                "(its sha256 names them in the fingerprint)"
            )
        if self.precision != "fp32":
            raise ValueError(
                f"--precision {self.precision} applies to the applications; a saved model runs in the dtypes it "
                "was saved with (use --precision fp32)"
            )

    @property
    def saved(self) -> bool:
        """Whether the model is a saved .keras file (not a Keras application)."""
        return is_saved_model(self.model)

    @property
    def application(self) -> Application | None:
        """The application's table row; None for a saved model."""
        return APPLICATIONS.get(self.model)

    def is_resolved(self) -> bool:
        """Whether the fingerprint can be named without reading any file."""
        if self.saved:
            return self.model_sha256 is not None and self.dim is not None and self.image_size is not None
        return self.weights in ("imagenet", "random") or self.weights_sha256 is not None

    def resolve(self) -> ModelConfig:
        """This config with every file it names read once: hashes, and a saved model's size, width and layer.

        An application's weights file is hashed. A saved model's file is hashed and, unless its
        size and width are already known (a config recorded by an earlier run), loaded with Keras
        to read them (pipeline/saved_model.py). As is when there is nothing to read.

        Raises:
            WeightsUnavailableError: a weights or model file is missing, unreadable or not a regular file.
            ValueError: a saved model that cannot be cut as asked (unknown layer, wrong input, ...).
        """
        if self.is_resolved():
            return self
        if not self.saved:
            return dataclasses.replace(self, weights_sha256=weights_file_sha256(self.weights))
        digest = self.model_sha256 or weights_file_sha256(self.model, what="model file")
        resolved = dataclasses.replace(self, model_sha256=digest)
        if self.dim is not None and self.image_size is not None:
            return resolved
        from pipeline.saved_model import inspect_saved_model

        cut = inspect_saved_model(self.model, self.layer, self.image_size)
        return dataclasses.replace(resolved, layer=cut.layer, image_size=cut.image_size, dim=cut.dim)

    def weights_id(self) -> str:
        """A stable name for the weights, computed without TensorFlow (and without reading a resolved file)."""
        if self.saved:
            return f"sha256:{(self.model_sha256 or self.resolve().model_sha256)[:16]}"
        if self.weights == "imagenet":
            return self.application.weights_id()
        if self.weights == "random":
            return f"random-seed:{self.seed}"
        # A config that was not resolved hashes the file on every call: resolve once and pass that on.
        digest = self.weights_sha256 or weights_file_sha256(self.weights)
        return f"sha256:{digest[:16]}"

    def fingerprint(self) -> str:
        """Identity of the model: vectors with different fingerprints never mix.

        An application's: `NAME-notop/POOLING/SxS/RESIZE/PREPROCESSING/PRECISION/WEIGHTS` (ResNet50's
        has always read so). A saved model's: `keras/LAYER/POOLING/SxS/RESIZE/preprocess-P/PRECISION/
        sha256:FILE`. A saved model's config that is not resolved is resolved here (slow: resolve once).
        """
        if self.saved:
            if not self.is_resolved():
                return self.resolve().fingerprint()
            return (
                f"keras/{self.layer}/{self.pooling}/{self.image_size}x{self.image_size}/{self.resize}"
                f"/preprocess-{self.preprocess}/{self.precision}/{self.weights_id()}"
            )
        return (
            f"{self.model}-notop/{self.pooling}/{self.image_size}x{self.image_size}/{self.resize}"
            f"/{self.application.preprocessing}/{self.precision}/{self.weights_id()}"
        )

    def to_record(self) -> dict:
        """The fields a manifest and index.json record, from which `ModelConfig(**record).resolve()` rebuilds
        this model (hashes are left out: whoever rebuilds it hashes the file again, to check it is the same)."""
        return {
            "model": self.model,
            "layer": self.layer,
            "preprocess": self.preprocess,
            "image_size": self.image_size,
            "pooling": self.pooling,
            "weights": self.weights,
            "seed": self.seed,
            "resize": self.resize,
            "precision": self.precision,
            "dim": self.dim,
        }


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Options of `embedpipe embed` that are not Beam pipeline options."""

    input: InputSpec  # a string (a path, glob or comma-separated list) is taken as InputSpec.of(it)
    output: str
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    batch_size: int = 0  # 0: auto (CPU_BATCH_SIZE, or GPU_BATCH_SIZE when the job asks for GPUs)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    draft: bool = True
    thumbnails: bool = False
    intra_op_threads: int = 0  # 0: TensorFlow decides
    decode_threads: int = 0  # 0: one per CPU core of the worker
    progress_seconds: float = 10.0
    # Where JPEGs are decoded: auto (the GPU when the worker has one and nvImageCodec imports), cpu, gpu.
    decode: str = "auto"
    # fused: decode beside inference in one stage; separate: a decode stage on CPU workers, the
    # pixels shuffled to an inference stage that alone asks for the GPU (pipeline/topology.py).
    decode_stage: str = "fused"
    decode_machine_type: str | None = None  # separate layout on Dataflow: the decode workers' machine type

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", InputSpec.of(self.input))
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 1 (or 0 for automatic); got {self.batch_size}")
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 1 (or 0 for one per CPU core); got {self.decode_threads}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1; got {self.max_pixels}")
        check_choice("decode", self.decode, DECODERS)
        check_choice("decode_stage", self.decode_stage, DECODE_STAGES)
        if self.decode_stage == "separate" and self.decode == "gpu":
            raise ValueError(
                "--decode gpu needs --decode-stage fused: with separate, decoding runs on CPU workers and only "
                "the inference stage has the GPU"
            )

    def resolve(self) -> EmbedConfig:
        """This config with its model's identity resolved (`ModelConfig.resolve`: a weights file is hashed)."""
        model = self.model.resolve()
        return self if model is self.model else dataclasses.replace(self, model=model)


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """Which index `embedpipe index` and `embedpipe nightly` build, and how: its defaults, written once."""

    index_type: str = "auto"  # auto | flat | ivf-flat | ivf-sq8 | ivf-pq | hnsw | a raw FAISS factory string
    metric: str = "cosine"  # cosine (unit vectors, inner product) or l2
    memory_budget: str | int = "4GB"  # RAM the finished index may use: drives `auto` and the PQ code size
    seed: int = 0  # seeds the training sample, the held-out queries and k-means
    recall_target: float = 0.95  # recall@10 that nprobe / efSearch are tuned to reach

    def __post_init__(self) -> None:
        check_choice("metric", self.metric, INDEX_METRICS)
        parse_memory_budget(self.memory_budget)  # a bad size is refused before any work, not after a night's

    @property
    def memory_budget_bytes(self) -> int:
        """The memory budget in bytes."""
        return parse_memory_budget(self.memory_budget)


def weights_file_sha256(path: str, *, what: str = "weights file") -> str:
    """sha256 of a weights file or saved model (`what`; any Beam filesystem); WeightsUnavailableError when it
    cannot be read."""
    from pipeline.storage import NotRegularFileError

    try:
        return file_sha256(path)
    except NotRegularFileError as exc:
        raise WeightsUnavailableError(f"{what} {path!r}: {exc}") from exc
    except Exception as exc:  # missing, unknown scheme, missing credentials, ...
        if isinstance(exc, FileNotFoundError) or not _exists(path):
            raise WeightsUnavailableError(missing_weights_message(path, what=what)) from exc
        raise WeightsUnavailableError(f"cannot read {what} {path!r}: {type(exc).__name__}: {exc}") from exc


def _exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    try:
        return FileSystems.exists(path)
    except Exception:  # an unknown scheme: whatever it names, it cannot be read
        return False


def file_sha256(path: str) -> str:
    """sha256 of a local or Beam-filesystem file, streamed."""
    from pipeline.storage import open_regular  # a FIFO or /dev/zero named as weights must not hang or never end

    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
