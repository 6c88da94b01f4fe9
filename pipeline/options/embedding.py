"""The option groups of commands that embed images (model, input, execution, size limits) and their configs.

`embed` and `nightly` take all of them, `demo` the model group, `query` the size limits; each
command's own module adds only what is its own. `model_config`, `input_spec` and `embed_config`
turn the parsed arguments into the configs the job takes.
"""

from __future__ import annotations

import argparse
import os

from pipeline.applications import APPLICATIONS, DEFAULT_MODEL, PREPROCESS_CHOICES, is_saved_model
from pipeline.config import (
    DECODE_STAGES,
    DECODERS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    POOLINGS,
    PRECISIONS,
    RESIZE_MODES,
    EmbedConfig,
    ModelConfig,
)
from pipeline.formats import FORMATS, TFRECORD_COMPRESSIONS, TFRECORD_IMAGE, TFRECORD_KEY
from pipeline.inputs import InputSpec, split_paths
from pipeline.options.runner import add_workers_option

_JIT = {"auto": None, "on": True, "off": False}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model group: everything that goes into the model fingerprint, and --jit."""
    g = parser.add_argument_group("model (all of these go into the model fingerprint)")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME|PATH.keras",
        help=f"a Keras application without its classifier ({', '.join(APPLICATIONS)}; `embedpipe models` lists "
        f"their vector widths and input sizes) or a saved Keras model, e.g. a fine-tuned one (PATH.keras, any "
        f"Beam filesystem; see --layer) (default {DEFAULT_MODEL})",
    )
    g.add_argument(
        "--layer",
        default=None,
        metavar="NAME",
        help="with --model PATH.keras: the layer whose output is the vector (a feature map is pooled by "
        "--pooling, a vector used as is); a layer of a nested model by its name or as OUTER/NAME "
        "(default: the model's output; `embedpipe models --model PATH.keras` lists the layers)",
    )
    g.add_argument(
        "--preprocess",
        choices=PREPROCESS_CHOICES,
        default="none",
        metavar="none|APPLICATION",
        help="with --model PATH.keras: none (default: RGB 0-255 as float32, for models that preprocess inside) "
        "or the application whose preprocess_input to apply first, e.g. resnet50 for a fine-tuned ResNet50 "
        "trained on preprocess_input'd images",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="square input size in pixels (default: the model's own: 224 for resnet50, `embedpipe models` lists "
        "the others; a saved model's input size, or 224 where its input is unsized)",
    )
    g.add_argument(
        "--pooling", choices=POOLINGS, default="avg", help="global pooling of the last feature map (default avg)"
    )
    g.add_argument(
        "--weights",
        default=None,
        help="'imagenet' (default: Keras downloads and caches them), 'random' (seeded; tests only) or PATH "
        "of a weights file of the headless --model (.weights.h5 or Keras' *_notop.h5; any Beam filesystem); "
        "not for a saved model, which holds its own",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for --weights random (default 0)")
    g.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default="squash",
        help="squash (default): scale the whole image to SxS, keeping all content (what Keras' "
        "image_dataset_from_directory does); center-crop: scale the short side to S and cut the middle",
    )
    g.add_argument("--precision", choices=PRECISIONS, default="fp32", help="compute precision (default fp32)")
    g.add_argument(
        "--jit",
        choices=tuple(_JIT),
        default="auto",
        help="compile the model with XLA (default auto: on for CPU workers at image size >= 224 and "
        "batch >= 16, off on GPUs)",
    )


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig of parsed model options (not resolved: `ModelConfig.resolve` reads a weights file)."""
    model = args.model
    if is_saved_model(model) and os.path.exists(model):
        # Recorded in the manifest and index.json, from which `query` and `serve` rebuild the model,
        # wherever they run from.
        model = os.path.abspath(model)
    return ModelConfig(
        model=model,
        layer=args.layer,
        preprocess=args.preprocess,
        image_size=args.image_size,
        pooling=args.pooling,
        weights=args.weights,
        seed=args.seed,
        resize=args.resize,
        precision=args.precision,
        jit=_JIT[args.jit],
    )


def add_input_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--input, and the input format group: --input-format and the per-format column/feature options."""
    parser.add_argument(
        "--input",
        required=required,
        help="directory, glob, or comma-separated list of image folders or shards: WebDataset tar, TFRecord, "
        "Parquet with image bytes, URI lists (local, gs://, s3://; docs/INPUT_FORMATS.md)",
    )
    g = parser.add_argument_group("input format (docs/INPUT_FORMATS.md)")
    g.add_argument(
        "--input-format",
        choices=FORMATS,
        default="auto",
        help="auto (default): from each path's extension (.tar/.tar.gz, .tfrecord[.gz], .parquet, .txt/.csv; "
        "a directory or anything else is a folder of image files); files: image files under a directory or "
        "glob; tar: WebDataset shards; tfrecord: tf.train.Example shards; parquet: image bytes in a column; "
        "urilist: text/CSV/Parquet lists of image URIs",
    )
    g.add_argument(
        "--tfrecord-key",
        default=TFRECORD_KEY,
        help="tf.train.Example feature holding the image id, e.g. image/filename (default image/id; "
        "a record without it gets SHARD#INDEX)",
    )
    g.add_argument(
        "--tfrecord-image",
        default=TFRECORD_IMAGE,
        help="feature holding the encoded image (default image/encoded; img2dataset's key/jpg are found without it)",
    )
    g.add_argument(
        "--tfrecord-compression",
        choices=TFRECORD_COMPRESSIONS,
        default="auto",
        help="auto (default): detected per shard from its first bytes; gzip; none",
    )
    g.add_argument(
        "--parquet-image-column", default="jpg", help="binary column with the image bytes (default jpg, as img2dataset)"
    )
    g.add_argument(
        "--parquet-id-column",
        default="key",
        help="column with the image id (default key, as img2dataset; without it ids are SHARD#row=N)",
    )
    g.add_argument(
        "--urilist-uri-column",
        default="uri",
        help="URI column of CSV/Parquet lists (default uri; url, path also found)",
    )
    g.add_argument(
        "--urilist-id-column",
        default="id",
        help="id column of CSV/Parquet lists (default id; without it the id is the URI relative to the input root)",
    )
    g.add_argument(
        "--allow-roots",
        default="",
        metavar="PREFIXES",
        help="comma-separated path prefixes (local folders, gs://bucket/dir, ...) that URI lists may name; a listed "
        "URI outside them becomes an `unreadable` row (default: any path the worker can read, see "
        "docs/INPUT_FORMATS.md)",
    )


def input_spec(args: argparse.Namespace) -> InputSpec:
    """The InputSpec of parsed input options: --input (a path, glob, or comma-separated list) and its format."""
    raw = args.input
    return InputSpec(
        paths=split_paths(raw) if isinstance(raw, str) else tuple(raw),
        format=args.input_format,
        tfrecord_key=args.tfrecord_key,
        tfrecord_image=args.tfrecord_image,
        tfrecord_compression=args.tfrecord_compression,
        parquet_image_column=args.parquet_image_column,
        parquet_id_column=args.parquet_id_column,
        urilist_uri_column=args.urilist_uri_column,
        urilist_id_column=args.urilist_id_column,
        allow_roots=tuple(r.strip() for r in getattr(args, "allow_roots", "").split(",") if r.strip()),
    )


def add_size_limits(
    group: argparse._ActionsContainer, *, what: str, then: str, max_pixels: int = DEFAULT_MAX_PIXELS, files: bool = True
) -> None:
    """--max-pixels (and with `files`, --max-bytes): a `what` (e.g. "query image") above a limit `then` (e.g.
    "are refused")."""
    group.add_argument(
        "--max-pixels",
        type=int,
        default=max_pixels,
        help=f"{what}s with more pixels (width x height) {then} (default {max_pixels:,})",
    )
    if files:
        group.add_argument(
            "--max-bytes",
            type=int,
            default=DEFAULT_MAX_BYTES,
            help=f"{what} files with more bytes {then} (default {DEFAULT_MAX_BYTES // 2**20} MiB)",
        )


def add_execution_options(parser: argparse.ArgumentParser) -> None:
    """The execution group: batching, workers, threads, decoding, limits, thumbnails, GPU, --dry-run."""
    g = parser.add_argument_group("execution")
    g.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="images per inference batch (default: 32 on CPU; 128 when the job asks for GPUs via "
        "--require-gpu or a worker_accelerator service option)",
    )
    add_workers_option(g)
    g.add_argument(
        "--threads-per-worker", type=int, default=0, help="TensorFlow intra-op threads per worker (default: TF decides)"
    )
    g.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="image decoding threads per worker process (default 0: one per CPU core)",
    )
    add_size_limits(g, what="image", then="become error rows")
    g.add_argument("--no-draft", action="store_true", help="always decode JPEGs at full size (slower)")
    g.add_argument(
        "--decode",
        choices=DECODERS,
        default="auto",
        help="where JPEGs are decoded: auto (default: on the GPU when the worker has one and nvImageCodec, "
        "`pip install embedpipe[gpu]`, imports; else on the CPU), cpu, gpu (fails at start-up without both)",
    )
    g.add_argument(
        "--decode-stage",
        choices=DECODE_STAGES,
        default="fused",
        help="fused (default): decode beside inference on each worker; separate: decode in a stage of its own "
        "(CPU workers) and shuffle the pixels to the inference stage, which alone asks for the GPU "
        "(Dataflow right fitting; docs/COST.md says when it pays)",
    )
    g.add_argument(
        "--decode-machine-type",
        default=None,
        metavar="TYPE",
        help="with --decode-stage separate on Dataflow: machine type of the decode workers (default: Dataflow's)",
    )
    g.add_argument("--thumbnails", action="store_true", help="store a small JPEG thumbnail per image (for `serve`)")
    g.add_argument("--require-gpu", action="store_true", help="fail at worker start-up when no GPU is visible")
    g.add_argument(
        "--dry-run", action="store_true", help="print the resolved options and the transform graph; run nothing"
    )


def add_embedding_options(parser: argparse.ArgumentParser) -> None:
    """Input, model and execution groups: all that `embed_config` reads (the output is each command's own)."""
    add_input_options(parser)
    add_model_options(parser)
    add_execution_options(parser)


def embed_config(args: argparse.Namespace, *, output: str = "") -> EmbedConfig:
    """The EmbedConfig of parsed options (add_embedding_options), writing to `output`."""
    return EmbedConfig(
        input=input_spec(args),
        output=output,
        model=model_config(args),
        batch_size=args.batch_size,
        max_pixels=args.max_pixels,
        max_bytes=args.max_bytes,
        draft=not args.no_draft,
        thumbnails=args.thumbnails,
        intra_op_threads=args.threads_per_worker,
        decode_threads=args.decode_threads,
        decode=args.decode,
        decode_stage=args.decode_stage,
        decode_machine_type=args.decode_machine_type,
    )
