"""Options of the embedding job and of the index, declared once and passed down to every stage.

The dataclasses are plain data (picklable, hashable) so that Beam can ship them to
workers and so that a worker-wide model cache can be keyed on them.
"""

from __future__ import annotations

import dataclasses
import hashlib

from pipeline.errors import WeightsUnavailableError
from pipeline.index.auto import parse_memory_budget
from pipeline.inputs import InputSpec

EMBEDDING_DIM = 2048
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
IMAGENET_NOTOP_MD5 = "4d473c1dd8becc155b73f8504c6f6626"


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """ValueError unless `value` is one of `choices` (the message names the option and every choice)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the vector an image gets.

    Two runs with equal `ModelConfig` (and equal weights bytes) produce identical
    embeddings; `fingerprint()` names that identity. A weights file is named by its
    sha256: `resolve()` hashes it once, in the driver, and the config carries the
    digest to every worker, so nothing downstream reads the file to name it.
    """

    image_size: int = 224
    pooling: str = "avg"
    weights: str = "imagenet"  # "imagenet", "random" or a path to a weights file
    seed: int = 0  # only used by weights="random"
    resize: str = "squash"
    precision: str = "fp32"
    # XLA: None = auto (pipeline.model.use_xla: on for full-size inputs on CPU workers,
    # off on GPUs). Not part of the fingerprint: it changes speed, not vectors
    # (max relative difference 2e-7 on CPU).
    jit: bool | None = None
    # sha256 of a weights file given by path, set by resolve(); None for imagenet and random.
    weights_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (ResNet50 downsamples 32x); got {self.image_size}")
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("resize", self.resize, RESIZE_MODES)
        check_choice("precision", self.precision, PRECISIONS)

    def resolve(self) -> ModelConfig:
        """This config with the weights file's sha256 filled in (the file is read here); as is otherwise.

        Raises:
            WeightsUnavailableError: the weights file is missing, unreadable or not a regular file.
        """
        if self.weights in ("imagenet", "random") or self.weights_sha256 is not None:
            return self
        return dataclasses.replace(self, weights_sha256=weights_file_sha256(self.weights))

    def weights_id(self) -> str:
        """A stable name for the weights, computed without TensorFlow (and without reading a resolved file)."""
        if self.weights == "imagenet":
            return f"imagenet-md5:{IMAGENET_NOTOP_MD5}"
        if self.weights == "random":
            return f"random-seed:{self.seed}"
        # A config that was not resolved hashes the file on every call: resolve once and pass that on.
        digest = self.weights_sha256 or weights_file_sha256(self.weights)
        return f"sha256:{digest[:16]}"

    def fingerprint(self) -> str:
        """Identity of the model: vectors with different fingerprints never mix."""
        return (
            f"resnet50-notop/{self.pooling}/{self.image_size}x{self.image_size}/{self.resize}"
            f"/caffe-bgr/{self.precision}/{self.weights_id()}"
        )


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


def weights_file_sha256(path: str) -> str:
    """sha256 of a weights file (any Beam filesystem); WeightsUnavailableError when it cannot be read."""
    from pipeline.storage import NotRegularFileError

    try:
        return file_sha256(path)
    except NotRegularFileError as exc:
        raise WeightsUnavailableError(f"weights file {path!r}: {exc}") from exc
    except Exception as exc:  # missing, unknown scheme, missing credentials, ...
        if isinstance(exc, FileNotFoundError) or not _exists(path):
            raise WeightsUnavailableError(missing_weights_message(path)) from exc
        raise WeightsUnavailableError(f"cannot read weights file {path!r}: {type(exc).__name__}: {exc}") from exc


def _exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    try:
        return FileSystems.exists(path)
    except Exception:  # an unknown scheme: whatever it names, it cannot be read
        return False


def missing_weights_message(path: str) -> str:
    """What to say about a --weights PATH that does not exist."""
    return (
        f"weights file {path!r} does not exist. --weights takes 'imagenet', 'random' "
        "or the path of a Keras weights file of the headless ResNet50 "
        "(a .weights.h5 from model.save_weights, or Keras' *_notop.h5)."
    )


def file_sha256(path: str) -> str:
    """sha256 of a local or Beam-filesystem file, streamed."""
    from pipeline.storage import open_regular  # a FIFO or /dev/zero named as weights must not hang or never end

    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
