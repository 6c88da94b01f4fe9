"""TensorFlow's start-up noise, silenced unless the user asked for detail (`-v`).

TensorFlow's native code writes lines such as "All log messages before absl::InitializeLog() is
called are written to STDERR", "Could not find cuda drivers on your machine" and "failed call to
cuInit" straight to file descriptor 2 while it is imported, before its own log level applies,
and a run prints them once per worker process. `embedpipe` sets `TF_CPP_MIN_LOG_LEVEL` (TF's own
switch, inherited by local worker processes) unless `-v` is given; `import_tensorflow` then
imports TensorFlow with descriptor 2 captured and writes back every captured line that is not
one of those known messages, so nothing else that happened meanwhile is lost.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading

# Lines TF's native code prints during import on machines without a GPU or with a CPU build.
_NOISE = re.compile(
    r"absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc|cuda_dnn\.cc|cuda_fft\.cc|cuda_blas\.cc"
    r"|computation_placer\.cc|oneDNN custom operations|This TensorFlow binary is optimized"
    r"|To enable the following instructions|rebuild TensorFlow with the appropriate compiler flags"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|TF-TRT Warning|port\.cc:\d+\] "
)
_LOCK = threading.Lock()


def wanted() -> bool:
    """True when TensorFlow's native logging is turned down (TF_CPP_MIN_LOG_LEVEL >= 2)."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip() in ("2", "3")


def import_tensorflow():
    """`import tensorflow`, with its native start-up noise kept off stderr when `wanted()`."""
    if "tensorflow" in sys.modules or not wanted():
        import tensorflow as tf

        return tf
    with _LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines(True) if not _NOISE.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
    return tf


def silence_by_default(verbose: bool) -> None:
    """The CLI's switch: TensorFlow logs errors only, unless verbose (the user's own setting wins)."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
