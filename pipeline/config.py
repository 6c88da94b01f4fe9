"""Options of the embedding job, declared once and passed down to every stage.

The dataclass is plain data (picklable, hashable) so that Beam can ship it to
workers and so that a worker-wide model cache can be keyed on it.
"""

from __future__ import annotations

import dataclasses
import hashlib

from pipeline.inputs import InputSpec

EMBEDDING_DIM = 2048
POOLINGS = ("avg", "max")
RESIZE_MODES = ("squash", "center-crop")
PRECISIONS = ("fp32", "bf16", "fp16")
DECODERS = ("auto", "cpu", "gpu")
DECODE_STAGES = ("fused", "separate")
# Measured: on CPU, batches beyond 32 gain nothing and hold more memory; a GPU
# needs a few hundred images in flight to stay busy (docs/GPU.md).
CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 128
DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: bigger than any camera, smaller than a bomb

# md5 that Keras itself checks for resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5;
# it identifies the ImageNet weights without reading (or importing) anything.
IMAGENET_NOTOP_MD5 = "4d473c1dd8becc155b73f8504c6f6626"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the vector an image gets.

    Two runs with equal `ModelConfig` (and equal weights bytes) produce identical
    embeddings; `fingerprint()` names that identity.
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

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (ResNet50 downsamples 32x); got {self.image_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {self.pooling!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}; got {self.resize!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {self.precision!r}")

    def weights_id(self) -> str:
        """A stable name for the weights, computed without TensorFlow."""
        if self.weights == "imagenet":
            return f"imagenet-md5:{IMAGENET_NOTOP_MD5}"
        if self.weights == "random":
            return f"random-seed:{self.seed}"
        return f"sha256:{file_sha256(self.weights)[:16]}"

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
    max_bytes: int = 256 * 1024 * 1024
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
        if self.decode not in DECODERS:
            raise ValueError(f"decode must be one of {', '.join(DECODERS)}; got {self.decode!r}")
        if self.decode_stage not in DECODE_STAGES:
            raise ValueError(f"decode_stage must be one of {', '.join(DECODE_STAGES)}; got {self.decode_stage!r}")
        if self.decode_stage == "separate" and self.decode == "gpu":
            raise ValueError(
                "--decode gpu needs --decode-stage fused: with separate, decoding runs on CPU workers and only "
                "the inference stage has the GPU"
            )


def file_sha256(path: str) -> str:
    """sha256 of a local or Beam-filesystem file, streamed."""
    from pipeline.storage import open_regular  # a FIFO or /dev/zero named as weights must not hang or never end

    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
