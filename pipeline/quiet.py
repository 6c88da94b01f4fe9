"""TensorFlow's start-up noise, silenced unless the user asked for detail (`-v`).

TensorFlow's native code writes lines such as "All log messages before absl::InitializeLog() is
called are written to STDERR", "Could not find cuda drivers on your machine" and "failed call to
cuInit" straight to file descriptor 2 while it is imported, before its own log level applies,
and a run prints them once per worker process. `embedpipe` sets `TF_CPP_MIN_LOG_LEVEL` (TF's own
switch, inherited by local worker processes) unless `-v` is given; `import_tensorflow` then
imports TensorFlow with descriptor 2 going through a filter that drops only those known
messages, so nothing else written meanwhile is lost.
"""

from __future__ import annotations

import os
import re
import sys
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
    """`import tensorflow`, with its native start-up noise kept off stderr when `wanted()`.

    Descriptor 2 goes to a pipe while TensorFlow imports; a thread forwards every line that is not
    known noise to the real stderr as it comes, so a crash during the import still shows its message.
    """
    if "tensorflow" in sys.modules or not wanted():
        import tensorflow as tf

        return tf
    with _LOCK:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
        forward = threading.Thread(target=_forward, args=(read_end, saved), name="embedpipe-quiet", daemon=True)
        forward.start()
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            import tensorflow as tf
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)  # the pipe's last writer is gone: the thread sees the end
            forward.join(timeout=5)
            os.close(saved)
    return tf


def _forward(read_end: int, out: int) -> None:
    with os.fdopen(read_end, "rb") as lines:
        for line in lines:
            if not _NOISE.search(line.decode(errors="replace")):
                os.write(out, line)


def silence_by_default(verbose: bool) -> None:
    """The CLI's switch: TensorFlow logs errors only, unless verbose (the user's own setting wins)."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
