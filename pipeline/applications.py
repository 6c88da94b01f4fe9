"""The Keras applications embedpipe can cut headless (`include_top=False`), as a table read without TensorFlow.

Each row says what `embedpipe models` lists and what the driver needs before any model is built:
the vector width (the Parquet schema is fixed when the pipeline is built), the default and the
smallest input size, how the application preprocesses its input (the fingerprint names it), and
the file and hash of Keras' own ImageNet weights without the classifier (the weights' identity
in the fingerprint, and what `ensure_weights_available` fetches). tests/test_model_zoo.py checks
every row against Keras itself.
"""

from __future__ import annotations

import dataclasses

_RESNET = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_EFFICIENTNETV2 = "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/"
_CONVNEXT = "https://storage.googleapis.com/tensorflow/keras-applications/convnext/"


@dataclasses.dataclass(frozen=True)
class Application:
    """One Keras application, cut where Keras cuts it with include_top=False."""

    name: str  # the --model value
    keras_name: str  # keras.applications.<keras_name>
    module: str  # keras.applications.<module>.preprocess_input is the application's own preprocessing
    dim: int  # vector width after global pooling of the last feature map
    default_size: int  # the input size its ImageNet weights were trained at
    # The fingerprint's name of the preprocessing: caffe-bgr (BGR, ImageNet means subtracted, in
    # preprocess_input) or in-model (the model rescales and normalises 0-255 RGB itself).
    preprocessing: str
    weights_url: str  # Keras' ImageNet weights without the classifier
    weights_hash: str  # the md5 (32 hex digits) or sha256 (64) Keras checks the download against
    min_size: int = 32  # Keras refuses smaller inputs: the trunk downsamples 32x

    @property
    def weights_file(self) -> str:
        """The file name Keras caches the ImageNet weights under (~/.keras/models/)."""
        return self.weights_url.rsplit("/", 1)[-1]

    def weights_id(self) -> str:
        """Identity of the ImageNet weights: Keras' own hash of the file."""
        kind = "md5" if len(self.weights_hash) == 32 else "sha256"
        digest = self.weights_hash if kind == "md5" else self.weights_hash[:16]
        return f"imagenet-{kind}:{digest}"


def _resnet(depth: int, md5: str) -> Application:
    module = "resnet50" if depth == 50 else "resnet"  # both are caffe mode; resnet50's is what embedpipe always used
    return Application(
        f"resnet{depth}",
        f"ResNet{depth}",
        module,
        2048,
        224,
        "caffe-bgr",
        f"{_RESNET}resnet{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5",
        md5,
    )


def _efficientnetv2(variant: str, dim: int, size: int, md5: str) -> Application:
    return Application(
        f"efficientnetv2-{variant}",
        f"EfficientNetV2{variant.upper()}",
        "efficientnet_v2",
        dim,
        size,
        "in-model",
        f"{_EFFICIENTNETV2}efficientnetv2-{variant}_notop.h5",
        md5,
    )


def _convnext(variant: str, keras_variant: str, dim: int, sha256: str) -> Application:
    return Application(
        f"convnext-{variant}",
        f"ConvNeXt{keras_variant}",
        "convnext",
        dim,
        224,
        "in-model",
        f"{_CONVNEXT}convnext_{variant}_notop.h5",
        sha256,
    )


APPLICATIONS: dict[str, Application] = {
    app.name: app
    for app in (
        _resnet(50, "4d473c1dd8becc155b73f8504c6f6626"),
        _resnet(101, "88cf7a10940856eca736dc7b7e228a21"),
        _resnet(152, "ee4c566cf9a93f14d82f913c2dc6dd0c"),
        _efficientnetv2("b0", 1280, 224, "893217f2bb855e2983157299931e43ff"),
        _efficientnetv2("b1", 1280, 240, "0e80663031ca32d657f9caa404b6ec37"),
        _efficientnetv2("b2", 1408, 260, "1dfe2e7a5d45b6632553a8961ea609eb"),
        _efficientnetv2("b3", 1536, 300, "f6abf7b5849ac99a89b50dd3fd532856"),
        _efficientnetv2("s", 1280, 384, "af0682fb74e8c54910f2d4393339c070"),
        _efficientnetv2("m", 1280, 480, "1b8dc055df72dde80d614482840fe342"),
        _efficientnetv2("l", 1280, 480, "b0b66b5c863aef5b46e8608fe1711615"),
        _convnext("tiny", "Tiny", 768, "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
        _convnext("small", "Small", 768, "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab"),
        _convnext("base", "Base", 1024, "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45"),
        _convnext("large", "Large", 1536, "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd"),
        _convnext("xlarge", "XLarge", 2048, "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05"),
    )
}

DEFAULT_MODEL = "resnet50"
SAVED_MODEL_SUFFIX = ".keras"
PREPROCESS_CHOICES = ("none", *APPLICATIONS)  # --preprocess of a saved model: none, or an application's


def is_saved_model(model: str) -> bool:
    """Whether --model names a saved Keras model file rather than an application."""
    return model not in APPLICATIONS and model.lower().endswith(SAVED_MODEL_SUFFIX)


def check_model_name(model: str) -> None:
    """ValueError unless `model` is an application name or the path of a .keras file."""
    if model in APPLICATIONS or is_saved_model(model):
        return
    raise ValueError(
        f"model must be one of {', '.join(APPLICATIONS)} or the path of a saved Keras model (.keras); got {model!r} "
        "(`embedpipe models` lists them)"
    )
