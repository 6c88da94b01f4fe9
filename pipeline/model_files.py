"""Files a model is made from (weights files, saved .keras models) on any Beam filesystem, and what to say
when one is missing. Keras reads only local files: a remote one is copied for as long as it loads."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from pipeline.errors import WeightsUnavailableError


@contextlib.contextmanager
def local_weights(weights: str, *, what: str = "weights file") -> Iterator[str]:
    """A local path of a weights file or saved model (`what`; any Beam filesystem) for the duration of the block.

    A local file is used where it is. A remote one is copied to a temporary file, which is
    deleted when the block ends: Keras has read the weights into the model by then, so a
    worker process holds no copy afterwards and a worker killed later leaves none behind.
    Raises WeightsUnavailableError for a missing, unreadable or non-regular file.
    """
    from apache_beam.io.filesystems import FileSystems

    from pipeline.storage import NotRegularFileError, check_regular, open_regular

    if os.path.exists(weights):
        try:
            check_regular(weights)  # a FIFO or device would hang or never end the load
        except NotRegularFileError as exc:
            raise WeightsUnavailableError(f"{what} {weights!r}: {exc}") from exc
        yield weights
        return
    try:
        exists = FileSystems.exists(weights)
    except Exception as exc:  # unknown scheme, missing credentials, ...
        raise WeightsUnavailableError(f"cannot access {what} {weights!r}: {exc}") from exc
    if not exists:
        raise WeightsUnavailableError(missing_weights_message(weights, what=what))
    suffix = ".weights.h5" if weights.endswith(".weights.h5") else os.path.splitext(weights)[1]
    fd, local = tempfile.mkstemp(suffix=suffix, prefix="embedpipe-weights-")
    try:
        with os.fdopen(fd, "wb") as out, open_regular(weights) as src:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                out.write(chunk)
        yield local
    finally:
        with contextlib.suppress(OSError):
            os.remove(local)


def missing_weights_message(path: str, *, what: str = "weights file") -> str:
    """What to say about a --weights PATH (or a --model PATH.keras, `what="model file"`) that does not exist."""
    if what == "model file":
        return (
            f"model file {path!r} does not exist. --model takes an application name (`embedpipe models` lists "
            "them) or the path of a saved Keras model (.keras, from model.save; any Beam filesystem)."
        )
    return (
        f"weights file {path!r} does not exist. --weights takes 'imagenet', 'random' "
        "or the path of a Keras weights file of the headless --model "
        "(a .weights.h5 from model.save_weights, or Keras' *_notop.h5)."
    )
