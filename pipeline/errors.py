"""The errors embedpipe explains in one line, and the exit code of `embedpipe` for each.

Code that finds a problem raises one of these with a message that says what is wrong and what
to do; `pipeline.cli.main` alone turns it into `<prefix>: <message>` on stderr and its
`exit_code`. Each class also keeps the built-in base its callers catch: ValueError for input
that cannot be used as given, RuntimeError for a run that failed, KeyError for an unknown id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar


class EmbedpipeError(Exception):
    """Base of embedpipe's own errors: `exit_code` is what `embedpipe` exits with (1 unless a subclass says)."""

    exit_code: ClassVar[int] = 1
    # The start of the message line where it is not "<command>: error" (nightly's "NOT published", ...).
    prefix: ClassVar[str | None] = None


class UsageError(EmbedpipeError, ValueError):
    """A command line, option value or input that cannot be what the user meant (exit code 2)."""

    exit_code = 2


class ModelFileError(UsageError):
    """A saved model (--model PATH.keras) that cannot be loaded or cut as asked: unknown layer, wrong input, ..."""


class UnavailableError(EmbedpipeError, RuntimeError):
    """Something the command needs is not available on this machine: weights, an optional package (exit 2)."""

    exit_code = 2


class WeightsUnavailableError(UnavailableError):
    """The requested weights cannot be loaded (offline, missing file, wrong file)."""


class NotPublishedError(EmbedpipeError, RuntimeError):
    """A nightly run that finished but is not published; LATEST stays where it was (exit code 3)."""

    exit_code = 3
    prefix = "embedpipe nightly: NOT published"


class BusyError(EmbedpipeError, RuntimeError):
    """Another run holds what this one needs (the run root's lock) (exit code 4)."""

    exit_code = 4
    prefix = "embedpipe nightly"


@contextlib.contextmanager
def refuse_unusable_paths() -> Iterator[None]:
    """In the block, an OSError (a root, index or output file that cannot be read or written) is a UsageError.

    For commands whose every path is the user's to fix (report, duplicates): the message is the OSError's.
    """
    try:
        yield
    except OSError as exc:
        raise UsageError(str(exc)) from exc
