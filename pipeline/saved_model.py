"""A saved Keras model (--model PATH.keras) cut at a layer: its input size, its vector and their checks.

A fine-tuned model carries its own top (classes of its own); the vector wanted is the output of a
layer before it. `--layer NAME` names it: a layer of the model, or of a model nested in it (the
usual fine-tuning graph calls a whole `keras.applications` model as one layer), by its bare name
when that is unique or by its path `outer/inner`. A feature map (rank 4) is pooled by --pooling, a
vector (rank 2) is used as is. The model gets RGB pixels as float32 0-255 at its own input size
(or --image-size where its input is unsized), after an application's preprocess_input only when
--preprocess names one: models that carry their preprocessing inside stay exact.

`inspect_saved_model` runs once, in the driver (`ModelConfig.resolve`), and names the cut fully
(layer path, size, width) so that workers and the fingerprint need not load anything to know it.
Loading uses Keras' safe mode: a model file never runs Python code of its own (a Lambda layer).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.errors import ModelFileError

DEFAULT_UNSIZED = 224  # the input size of a model whose input is unsized, unless --image-size says otherwise


@dataclasses.dataclass(frozen=True)
class Cut:
    """Where a saved model is cut, as resolved from the file."""

    layer: str  # full path: names of nested models and the layer, joined by "/"
    image_size: int
    dim: int
    rank: int  # 4: a feature map, pooled; 2: a vector, used as is


def load_saved_model(path: str) -> Any:
    """The Keras model in a .keras file on any Beam filesystem (a remote one is copied while it loads).

    Raises:
        WeightsUnavailableError: the file is missing or unreadable.
        ModelFileError: Keras cannot load it (not a .keras file, a custom or Lambda layer, ...).
    """
    import keras

    from pipeline.model_files import local_weights

    with local_weights(path, what="model file") as local:
        try:
            return keras.saving.load_model(local, compile=False, safe_mode=True)
        except Exception as exc:
            raise ModelFileError(
                f"cannot load the saved model {path!r} ({type(exc).__name__}: {_first_line(exc)}); it must be a "
                "model.save(...) .keras file whose layers are Keras' own or registered in a module the workers "
                "import (Lambda layers are refused: loading them would run code from the file)"
            ) from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _is_model(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def iter_layers(model: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, layer) of every layer, nested models' layers after the model itself."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        yield path, layer
        if _is_model(layer):
            yield from iter_layers(layer, f"{path}/")


def find_layer(model: Any, name: str, *, what: str) -> list[str]:
    """The path of the layer `name` names: `a/b` literally; a bare name at the top level, else wherever it is
    unique among nested models. ModelFileError (with the closest names) when it names none or several."""
    paths = [path for path, _ in iter_layers(model)]
    if "/" in name:
        if name in paths:
            return name.split("/")
        found = []
    else:
        found = [p for p in paths if p.rsplit("/", 1)[-1] == name]
        if name in found:
            return [name]
    if len(found) == 1:
        return found[0].split("/")
    if len(found) > 1:
        raise ModelFileError(f"--layer {name!r} names {len(found)} layers of {what}: {', '.join(found)}; give its path")
    names = {p.rsplit("/", 1)[-1]: p for p in paths}
    close = difflib.get_close_matches(name.rsplit("/", 1)[-1], list(names), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(names[c] for c in close)}?" if close else ""
    raise ModelFileError(
        f"--layer {name!r} is not a layer of {what}{hint} (`embedpipe models --model {what}` lists its layers)"
    )


def _output_of(layer: Any, what: str, path: str) -> Any:
    try:
        return layer.output
    except Exception as exc:  # a shared layer (several calls) or several outputs: no single tensor to cut at
        raise ModelFileError(f"--layer {path!r} of {what} has no single output to cut at ({_first_line(exc)})") from exc


def _cut(model: Any, path: list[str], what: str, walked: str = "") -> Callable[[Any], Any]:
    """A function from the model's input to the output of the layer at `path` (Keras models composed)."""
    import keras

    layer = model.get_layer(path[0])
    here = f"{walked}{path[0]}"
    if len(path) == 1:
        return keras.Model(model.inputs[0], _output_of(layer, what, here))
    # A nested model is one layer of its parent's graph: the parent's graph up to the nested model's
    # input, then the nested model's graph up to the layer.
    nodes = getattr(layer, "_inbound_nodes", [])
    if len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
        raise ModelFileError(
            f"--layer {'/'.join(path)!r}: the nested model {here!r} of {what} is called {len(nodes)} time(s) "
            "or on several inputs; cut at a layer of the outer model instead"
        )
    feed = keras.Model(model.inputs[0], nodes[0].input_tensors[0])
    inner = _cut(layer, path[1:], what, f"{here}/")
    return lambda x: inner(feed(x))


def input_size(model: Any, what: str, image_size: int | None) -> int:
    """The size to feed a loaded model: its input's, or `image_size` (else 224) where it is unsized; ModelFileError
    for an input embedpipe cannot feed, or an `image_size` that contradicts it."""
    if len(model.inputs) != 1:
        raise ModelFileError(f"{what} takes {len(model.inputs)} inputs; embedpipe feeds it one batch of images")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] not in (3, None):
        raise ModelFileError(f"{what} takes inputs of shape {shape}; embedpipe feeds RGB images (N, S, S, 3)")
    height, width = shape[1], shape[2]
    if height != width:
        raise ModelFileError(
            f"{what} takes {height}x{width} inputs; embedpipe feeds square images (S x S): save the model with a "
            "square or an unsized input"
        )
    if height is None:
        return image_size or DEFAULT_UNSIZED
    if image_size not in (None, height):
        raise ModelFileError(
            f"{what} takes {height}x{height} inputs; --image-size {image_size} cannot feed it (leave "
            "--image-size out: a saved model's own input size is used)"
        )
    return height


def features(model: Any, what: str, layer: str | None) -> tuple[Callable[[Any], Any], str]:
    """(input -> the layer's output, the layer's full path) of a loaded model `what`; no layer: its output."""
    if layer is not None:
        path = find_layer(model, layer, what=what)
    elif len(model.outputs) != 1:
        raise ModelFileError(f"{what} has {len(model.outputs)} outputs; name the one to embed with --layer")
    else:
        history = getattr(model.outputs[0], "_keras_history", None)
        path = [history.operation.name if history is not None else model.layers[-1].name]
    return _cut(model, path, what), "/".join(path)


def cut_saved_model(model: Any, what: str, layer: str | None, image_size: int) -> tuple[Callable[[Any], Any], Cut]:
    """(float32 pixels -> the layer's output, the Cut) of a loaded model `what` at an input size."""
    import keras

    fn, layer = features(model, what, layer)
    probe = keras.Input((image_size, image_size, 3), dtype="float32")
    try:
        shape = tuple(fn(probe).shape)
    except Exception as exc:  # too small an input for its strides, ...
        raise ModelFileError(
            f"{what} cannot take {image_size}x{image_size} inputs ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if len(shape) not in (2, 4) or shape[-1] is None:
        raise ModelFileError(
            f"--layer {layer!r} of {what} outputs shape {shape}; embedpipe embeds a feature map (rank 4, "
            "pooled by --pooling) or a vector (rank 2): pick another layer (`embedpipe models --model "
            f"{what}` lists them)"
        )
    return fn, Cut(layer=layer, image_size=image_size, dim=int(shape[-1]), rank=len(shape))


def inspect_saved_model(path: str, layer: str | None, image_size: int | None) -> Cut:
    """Load the model at `path` (TensorFlow, seconds) and resolve the cut: the layer's path, input size, width.

    Raises:
        WeightsUnavailableError: the file is missing or unreadable.
        ModelFileError: it cannot be loaded or cut as asked.
    """
    from pipeline.quiet import import_tensorflow

    import_tensorflow()
    model = load_saved_model(path)
    _, cut = cut_saved_model(model, path, layer, input_size(model, path, image_size))
    return cut


def describe_layers(path: str) -> list[dict]:
    """Every layer of a saved model with its output shape and what --layer would make of it (`embedpipe models`)."""
    from pipeline.quiet import import_tensorflow

    import_tensorflow()
    model = load_saved_model(path)
    rows = []
    for name, layer in iter_layers(model):
        try:
            shape = tuple(layer.output.shape)
        except Exception:  # a shared layer has no single output
            shape = None
        if shape is not None and len(shape) == 4:
            use = f"feature map: pooled to {shape[-1]}"
        elif shape is not None and len(shape) == 2:
            use = f"vector of {shape[-1]}"
        else:
            use = "-"
        rows.append({"layer": name, "type": type(layer).__name__, "output_shape": shape, "embeds": use})
    return rows
