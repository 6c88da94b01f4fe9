"""One nightly run at a time per run root: the lock `ROOT/nightly.lock`.

- Local roots: `fcntl.flock` on the file. The kernel drops the lock when the holding
  process exits, however it exits, so a killed run never leaves a stale lock behind. The
  file holds the holder's host, pid, run id and start time, for the message of the run
  that finds it taken; it is never deleted (deleting a flock'ed file lets two processes
  lock two different files of the same name).
- `gs://` roots: an object created with `if_generation_match=0`, which GCS lets exactly
  one writer win. A heartbeat thread rewrites it every few minutes with
  `if_generation_match=<its generation>`; a lock whose object was last written more than
  `stale_after` seconds ago (GCS's own `updated` time: the clocks of the two runs never
  meet) belongs to a dead run and is broken by deleting exactly that generation, then
  acquired like any other: of two runs breaking the same stale lock, one deletes it and
  the other's delete fails its precondition. Release deletes the object at our generation,
  so a run never deletes a lock that someone else took over.
- Other schemes (s3://, ...) have no conditional write we use: refused unless the lock is
  turned off (`--no-lock`), which makes the operator responsible for running one at a time.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable

from apache_beam.io.filesystems import FileSystems

from pipeline.errors import BusyError, NotPublishedError
from pipeline.storage import is_local, safe_text

log = logging.getLogger(__name__)

LOCK_NAME = "nightly.lock"
DEFAULT_STALE_AFTER = 2 * 3600.0  # seconds without a heartbeat after which a gs:// lock is a dead run's
HEARTBEAT_SECONDS = 300.0


class LockHeldError(BusyError):
    """Another nightly run holds the root's lock."""


class LockLostError(NotPublishedError):
    """The lock this run held was broken (its heartbeat was too old) or deleted by someone else."""


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _field(info: dict, key: str) -> str:
    # A lock file is anyone's to write: its fields reach the message as one short line of text.
    return " ".join(safe_text(str(info.get(key, "?"))).split())[:100] or "?"


def _holder(info: dict) -> str:
    """`run R, pid P on host H, started T` of a lock's content (fields may be missing)."""
    return (
        f"run {_field(info, 'run_id')}, pid {_field(info, 'pid')} on host {_field(info, 'host')}, "
        f"started {_field(info, 'started_at')}"
    )


def _parse(content: bytes) -> dict | None:
    """A lock's content as a dict, or None when it is not one of ours (empty, not JSON, not an object)."""
    try:
        info = json.loads(content)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


class _Lock:
    """What every lock offers: check() before publishing, release() at the end, `with` support."""

    def __init__(self, path: str, run_id: str, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "run_id": run_id,
            "started_at": _iso(clock()),
            "token": uuid.uuid4().hex,  # tells our own lock from another run's with the same pid
        }

    def _payload(self) -> bytes:
        return json.dumps(self.info, sort_keys=True).encode()

    def check(self) -> None:
        """Raise LockLostError unless this run still holds the lock."""

    def release(self) -> None:
        """Give the lock up (a lock that was taken over is left to its new holder)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class NoLock(_Lock):
    """`--no-lock`: nothing is locked; the operator makes sure one run at a time uses the root."""


class LocalLock(_Lock):
    """flock(2) on ROOT/nightly.lock."""

    def acquire(self) -> LocalLock:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise LockHeldError(f"{safe_text(self.path)} is not a regular file; remove it and run again")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockHeldError(self._held_message(os.pread(fd, 65536, 0))) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._payload(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _held_message(self, content: bytes) -> str:
        root = safe_text(os.path.dirname(self.path))
        info = _parse(content)
        if info is None:  # the holder is between taking the lock and writing its name
            return f"another nightly run holds the lock on {root} (it is just starting); wait for it to finish"
        return (
            f"another nightly run holds the lock on {root} ({_holder(info)}); wait for it to finish. A local lock "
            f"is released when its process exits, so that process is still running (`kill {_field(info, 'pid')}` "
            f"on {_field(info, 'host')} stops it if it is stuck)"
        )

    def release(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # a reader never finds a finished run named as the holder
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class GcsLock(_Lock):
    """A generation-checked object ROOT/nightly.lock with a heartbeat (module docstring)."""

    def __init__(
        self,
        path: str,
        run_id: str,
        clock: Callable[[], float],
        *,
        client,
        stale_after: float,
        heartbeat: float,
    ) -> None:
        super().__init__(path, run_id, clock)
        bucket, _, self._name = path[len("gs://") :].partition("/")
        self._bucket = client.bucket(bucket)
        self._stale_after = stale_after
        self._interval = heartbeat
        self._generation: int | None = None
        self._lost: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stamp(self) -> bytes:
        self.info["heartbeat_at"] = _iso(self._clock())
        return self._payload()

    def acquire(self, *, start_heartbeat: bool = True) -> GcsLock:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        for _ in range(5):  # each pass either wins, fails, or saw the object change under it
            blob = self._bucket.blob(self._name)
            try:
                blob.upload_from_string(self._stamp(), content_type="application/json", if_generation_match=0)
                self._generation = blob.generation
                break
            except PreconditionFailed:
                pass  # someone holds it (or our own create succeeded and its retry was refused)
            current = self._bucket.get_blob(self._name)
            if current is None:
                continue  # released meanwhile
            try:
                holder = _parse(current.download_as_bytes(if_generation_match=current.generation)) or {}
            except (NotFound, PreconditionFailed):
                continue
            if holder.get("token") == self.info["token"]:
                self._generation = current.generation  # our create went through; its reply was lost
                break
            age = self._clock() - current.updated.timestamp()
            if age < self._stale_after:
                raise LockHeldError(self._held_message(holder, age))
            log.warning(
                "embedpipe nightly: breaking the stale lock %s (%s; no heartbeat for %.1f h)",
                self.path,
                _holder(holder),
                age / 3600,
            )
            with contextlib.suppress(NotFound, PreconditionFailed):  # another run broke or renewed it first
                current.delete(if_generation_match=current.generation)
        else:
            raise LockHeldError(f"the lock {self.path} kept changing while this run tried to take it; run again")
        if start_heartbeat:
            self._thread = threading.Thread(target=self._beat_forever, name="embedpipe-lock-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _held_message(self, holder: dict, age: float) -> str:
        root = self.path.rsplit("/", 1)[0]
        return (
            f"another nightly run holds the lock on {root} ({_holder(holder)}, last heartbeat {age / 60:.0f} min "
            f"ago); wait for it to finish. If it died, the next run takes the lock over once the heartbeat is "
            f"{self._stale_after / 3600:.1f} h old (--lock-stale-after), or delete {self.path} now if you are sure"
        )

    def _beat_forever(self) -> None:
        while not self._stop.wait(self._interval):
            self.beat()

    def beat(self) -> None:
        """Rewrite the lock at our generation; a refused rewrite means the lock was broken (check() says so)."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        with self._mutex:
            if self._lost or self._generation is None:
                return
            blob = self._bucket.blob(self._name)
            try:
                blob.upload_from_string(
                    self._stamp(), content_type="application/json", if_generation_match=self._generation
                )
                self._generation = blob.generation
                return
            except (NotFound, PreconditionFailed):
                pass  # broken or deleted, or our rewrite went through and only its reply was lost
            except Exception as exc:  # transient: the next beat tries again, long before the lock is stale
                log.warning("embedpipe nightly: lock heartbeat failed (%s); retrying", exc)
                return
            try:
                current = self._bucket.get_blob(self._name)
                theirs = _parse(current.download_as_bytes(if_generation_match=current.generation)) if current else {}
            except NotFound:
                current, theirs = None, {}
            except Exception as exc:  # changed again while read, or transient: look at the next beat
                log.warning("embedpipe nightly: could not read the lock back (%s); retrying", exc)
                return
            if current is not None and (theirs or {}).get("token") == self.info["token"]:
                self._generation = current.generation
            else:
                who = _holder(theirs) if theirs else ("deleted" if current is None else "not an embedpipe lock now")
                self._lost = f"the lock {self.path} was taken over ({who})"
                log.error("embedpipe nightly: %s; this run will not publish", self._lost)

    def check(self) -> None:
        with self._mutex:
            if not self._lost:
                current = self._bucket.get_blob(self._name)
                if current is None or current.generation != self._generation:
                    self._lost = f"the lock {self.path} is no longer this run's (broken as stale or deleted)"
            if self._lost:
                raise LockLostError(self._lost)

    def release(self) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            generation, self._generation = self._generation, None
            if generation is None or self._lost:
                return
            try:
                self._bucket.blob(self._name).delete(if_generation_match=generation)
            except (NotFound, PreconditionFailed):
                log.warning("embedpipe nightly: the lock %s was taken over; left to its new holder", self.path)
            except Exception as exc:  # the run's own outcome stands; the lock goes stale and is broken later
                log.warning(
                    "embedpipe nightly: could not release %s (%s); the next run breaks it once it is %.1f h old",
                    self.path,
                    exc,
                    self._stale_after / 3600,
                )


def acquire(
    root: str,
    *,
    run_id: str,
    enabled: bool = True,
    stale_after: float = DEFAULT_STALE_AFTER,
    client=None,
    clock: Callable[[], float] = time.time,
) -> _Lock:
    """Take ROOT's nightly lock (use it as a context manager); LockHeldError when another run has it.

    Args:
        root: the run root (local or gs://; other schemes need enabled=False).
        run_id: this run, written into the lock for the message of a run that finds it taken.
        enabled: False (`--no-lock`) skips locking.
        stale_after: gs:// only: seconds without a heartbeat after which the lock is broken.
        client: a google.cloud.storage Client (default: a new one with the environment's credentials).
        clock: seconds since the epoch (tests pass a fake one).
    """
    root = root.rstrip("/")
    path = f"{root}/{LOCK_NAME}"
    if not stale_after > 0:
        raise ValueError(f"--lock-stale-after must be more than 0 seconds; got {stale_after}")
    if not enabled:
        log.warning("embedpipe nightly: --no-lock: nothing stops a second run on %s from racing this one", root)
        return NoLock(path, run_id, clock)
    if is_local(root):
        return LocalLock(path, run_id, clock).acquire()
    if FileSystems.get_scheme(root) == "gs":
        if client is None:
            from google.cloud import storage

            client = storage.Client()
        heartbeat = min(HEARTBEAT_SECONDS, stale_after / 4)
        return GcsLock(path, run_id, clock, client=client, stale_after=stale_after, heartbeat=heartbeat).acquire()
    raise ValueError(
        f"cannot lock {root}: the nightly lock works on local folders and gs:// only; run on one of those, "
        "or pass --no-lock and make sure only one nightly run uses this root at a time"
    )
