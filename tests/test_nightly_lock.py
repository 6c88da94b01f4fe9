"""One nightly run at a time per root; LATEST only moves forward.

The gs:// lock runs against an in-memory stand-in for google-cloud-storage's client, bucket
and blob (the cloud boundary: this machine cannot reach GCS) that enforces the same
generation preconditions and raises the same google.api_core exceptions as the real
service. Everything else is real: flock, subprocesses, the CLI, Beam, Parquet, FAISS.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
from google.api_core.exceptions import NotFound, PreconditionFailed, ServiceUnavailable
from odd_images import encode, photo

import pipeline.nightly as nightly_module
from pipeline import lock as locks
from pipeline.cli import main
from pipeline.nightly import read_latest
from pipeline.ownership import claim

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["--weights", "random", "--image-size", "32", "--batch-size", "4", "--index-type", "flat"]


# ---------------------------------------------------------------- a GCS stand-in


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeGcs:
    """Objects of one bucket: name -> (bytes, generation, updated). Generations only grow, as in GCS."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.objects: dict[str, tuple[bytes, int, float]] = {}
        self.generation = 1000
        self.before_delete = None  # a hook to interleave another run between a read and a delete
        self.lose_next_reply = False  # the next upload succeeds, but its caller sees the retry's 412
        self.unavailable: set[str] = set()  # calls ("upload", "delete") that fail once with a 503

    def bucket(self, name: str) -> FakeBucket:  # google.cloud.storage.Client.bucket
        return FakeBucket(self, name)


class FakeBucket:
    def __init__(self, store: FakeGcs, name: str) -> None:
        self.store, self.name = store, name

    def blob(self, blob_name: str) -> FakeBlob:
        return FakeBlob(self.store, blob_name)

    def get_blob(self, blob_name: str) -> FakeBlob | None:
        if blob_name not in self.store.objects:
            return None
        blob = FakeBlob(self.store, blob_name)
        _, blob.generation, updated = self.store.objects[blob_name]
        blob.updated = datetime.datetime.fromtimestamp(updated, datetime.timezone.utc)
        return blob


class FakeBlob:
    def __init__(self, store: FakeGcs, name: str) -> None:
        self.store, self.name = store, name
        self.generation: int | None = None
        self.updated: datetime.datetime | None = None

    def _check(self, if_generation_match: int | None, *, missing_is_404: bool) -> None:
        current = self.store.objects.get(self.name)
        if if_generation_match is None:
            if current is None and missing_is_404:
                raise NotFound(f"No such object: {self.name}")
            return
        if current is None:
            if if_generation_match == 0:
                return
            if missing_is_404:
                raise NotFound(f"No such object: {self.name}")
            raise PreconditionFailed("At least one of the pre-conditions you specified did not hold.")
        if current[1] != if_generation_match:
            raise PreconditionFailed("At least one of the pre-conditions you specified did not hold.")

    def _maybe_unavailable(self, call: str) -> None:
        if call in self.store.unavailable:
            self.store.unavailable.discard(call)
            raise ServiceUnavailable("We encountered an internal error. Please try again.")

    def upload_from_string(self, data, content_type="text/plain", if_generation_match=None) -> None:
        self._maybe_unavailable("upload")
        self._check(if_generation_match, missing_is_404=False)
        self.store.generation += 1
        data = data.encode("utf-8") if isinstance(data, str) else bytes(data)  # as the real client does
        self.store.objects[self.name] = (data, self.store.generation, self.store.clock())
        self.generation = self.store.generation
        if self.store.lose_next_reply:
            self.store.lose_next_reply = False
            raise PreconditionFailed("At least one of the pre-conditions you specified did not hold.")

    def download_as_bytes(self, if_generation_match=None) -> bytes:
        self._check(if_generation_match, missing_is_404=True)
        return self.store.objects[self.name][0]

    def delete(self, if_generation_match=None) -> None:
        self._maybe_unavailable("delete")
        if self.store.before_delete is not None:
            hook, self.store.before_delete = self.store.before_delete, None
            hook()
        self._check(if_generation_match, missing_is_404=True)
        del self.store.objects[self.name]


ROOT = "gs://bucket/embedpipe"
NAME = "embedpipe/nightly.lock"


def gcs_lock(store: FakeGcs, run_id: str, **kw) -> locks.GcsLock:
    return locks.acquire(ROOT, run_id=run_id, client=store, clock=store.clock, **kw)


@pytest.fixture
def store() -> FakeGcs:
    return FakeGcs(FakeClock())


def test_gcs_lock_has_one_holder_and_the_other_run_is_told_who(store):
    first = gcs_lock(store, "20261128T020000Z")
    holder = json.loads(store.objects[NAME][0])
    assert holder["run_id"] == "20261128T020000Z" and holder["pid"] == os.getpid()
    assert holder["host"] == socket.gethostname() and holder["started_at"] == "2027-01-15T08:00:00Z"
    with pytest.raises(locks.LockHeldError) as refused:
        gcs_lock(store, "20261128T020001Z")
    message = str(refused.value)
    assert "\n" not in message
    assert f"run 20261128T020000Z, pid {os.getpid()} on host {socket.gethostname()}" in message
    assert "started 2027-01-15T08:00:00Z, last heartbeat 0 min ago" in message
    assert f"delete {ROOT}/nightly.lock" in message and "--lock-stale-after" in message
    first.release()
    assert NAME not in store.objects
    gcs_lock(store, "20261128T020001Z").release()  # free again at once


def test_gcs_heartbeat_keeps_a_long_run_and_a_dead_run_is_broken_once(store):
    long_run = gcs_lock(store, "r1")
    for _ in range(3):  # 3 h in all, with a heartbeat every 1.5 h: never stale
        store.clock.now += 1.5 * 3600
        long_run.beat()
        with pytest.raises(locks.LockHeldError):
            gcs_lock(store, "r2")
    long_run.check()
    store.clock.now += 2 * 3600 + 1  # then it dies: no heartbeat for more than 2 h
    stale = store.objects[NAME][1]
    taker = gcs_lock(store, "r2")
    assert json.loads(store.objects[NAME][0])["run_id"] == "r2" and store.objects[NAME][1] > stale
    # The old holder, if it was only paused, learns it lost the lock and must not publish.
    with pytest.raises(locks.LockLostError, match="no longer this run's"):
        long_run.check()
    long_run.beat()
    long_run.release()  # leaves the new holder's lock alone
    assert json.loads(store.objects[NAME][0])["run_id"] == "r2"
    taker.check()
    taker.release()


def test_a_lock_taken_over_between_heartbeats_is_seen_by_the_next_beat(store):
    held = gcs_lock(store, "r1")
    store.clock.now += 3 * 3600
    gcs_lock(store, "r2")  # breaks r1's lock as stale
    held.beat()  # its precondition fails: the heartbeat records the loss
    with pytest.raises(locks.LockLostError, match=r"taken over \(run r2"):
        held.check()


def test_two_runs_breaking_one_stale_lock_cannot_both_win(store):
    dead = gcs_lock(store, "dead")
    dead._stop.set()  # its process is gone: no more heartbeats
    store.clock.now += 3 * 3600
    winners = []
    # B has read the stale lock and is about to delete it; C breaks it and takes it first.
    store.before_delete = lambda: winners.append(gcs_lock(store, "C"))
    with pytest.raises(locks.LockHeldError, match="run C"):
        gcs_lock(store, "B")
    assert [w.info["run_id"] for w in winners] == ["C"]
    assert json.loads(store.objects[NAME][0])["run_id"] == "C"
    winners[0].check()


def test_a_create_whose_reply_was_lost_is_recognised_as_ours(store):
    store.lose_next_reply = True  # the create went through; the client's retry got 412
    held = gcs_lock(store, "r1")
    held.check()
    held.release()
    assert NAME not in store.objects


def test_transient_errors_neither_lose_the_lock_nor_fail_the_run(store):
    held = gcs_lock(store, "r1")
    generation = store.objects[NAME][1]
    store.unavailable.add("upload")
    held.beat()  # a 503: logged, tried again at the next beat
    assert store.objects[NAME][1] == generation
    held.check()
    held.beat()
    assert store.objects[NAME][1] > generation
    store.unavailable.add("delete")
    held.release()  # a 503 on release is logged; the lock goes stale and the next run breaks it
    store.clock.now += 2 * 3600 + 1
    gcs_lock(store, "r2").release()


def test_a_lock_someone_else_wrote_is_reported_on_one_line(store):
    store.bucket("bucket").blob(NAME).upload_from_string(
        json.dumps({"run_id": "x\ny", "host": "evil\r\nhost", "pid": [1, 2]}), if_generation_match=0
    )
    with pytest.raises(locks.LockHeldError) as refused:
        gcs_lock(store, "r1")
    assert "\n" not in str(refused.value) and "\r" not in str(refused.value)
    assert "(run x y, pid [1, 2] on host evil host, started ?, last heartbeat 0 min ago)" in str(refused.value)
    store.objects[NAME] = (b"[not, json", store.objects[NAME][1], store.objects[NAME][2])
    with pytest.raises(locks.LockHeldError, match=r"\(run \?, pid \? on host \?, started \?, last heartbeat"):
        gcs_lock(store, "r1")


def test_the_heartbeat_thread_rewrites_the_lock(store):
    held = gcs_lock(store, "r1", stale_after=0.2)  # heartbeat every 0.05 s
    first = store.objects[NAME][1]
    deadline = time.monotonic() + 30
    while store.objects[NAME][1] == first and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.objects[NAME][1] > first, "no heartbeat within 30 s"
    held.check()
    held.release()
    assert NAME not in store.objects and not held._thread.is_alive()


def test_without_a_client_the_real_storage_client_is_used(monkeypatch, store):
    from google.cloud import storage

    monkeypatch.setattr(storage, "Client", lambda: store)
    with locks.acquire(ROOT, run_id="r1", clock=store.clock):
        assert json.loads(store.objects[NAME][0])["run_id"] == "r1"
    assert NAME not in store.objects


def test_other_schemes_are_refused_unless_the_lock_is_turned_off():
    with pytest.raises(ValueError, match=r"cannot lock s3://b/root: .* --no-lock"):
        locks.acquire("s3://b/root", run_id="r1")
    with locks.acquire("s3://b/root", run_id="r1", enabled=False) as held:
        held.check()


def test_a_run_whose_lock_was_broken_does_not_publish(store, tmp_path):
    held = gcs_lock(store, "r2")  # a driver that then stalls for hours: its lock is broken as stale
    store.clock.now += 3 * 3600
    gcs_lock(store, "r3")
    root = tmp_path / "root"
    (root / "runs" / "r2").mkdir(parents=True)
    (root / "LATEST").write_text("r1\n")
    with pytest.raises(nightly_module.ValidationError, match=r"nightly.lock is no longer this run's"):
        nightly_module._publish(str(root), "r2", str(root / "runs" / "r2"), {"run_id": "r2"}, held, 0.0)
    assert read_latest(str(root)) == "r1"
    assert json.loads((root / "runs/r2/manifest.json").read_text())["published"] is False


# ---------------------------------------------------------------- local: flock


def test_local_lock_is_exclusive_and_names_its_holder(tmp_path):
    first = locks.acquire(str(tmp_path), run_id="r1")
    with pytest.raises(locks.LockHeldError) as refused:
        locks.acquire(str(tmp_path), run_id="r2")
    assert f"run r1, pid {os.getpid()} on host {socket.gethostname()}, started " in str(refused.value)
    assert f"`kill {os.getpid()}`" in str(refused.value)
    first.release()
    locks.acquire(str(tmp_path), run_id="r2").release()


def test_a_killed_holder_leaves_no_stale_local_lock(tmp_path):
    code = (
        "import sys\n"
        "from pipeline import lock\n"
        f"lock.acquire({str(tmp_path)!r}, run_id='killed')\n"
        "print('LOCKED', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline().strip() == b"LOCKED"
        with pytest.raises(locks.LockHeldError, match=f"run killed, pid {holder.pid}"):
            locks.acquire(str(tmp_path), run_id="r2")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    locks.acquire(str(tmp_path), run_id="r2").release()  # the kernel released it with the process


# ---------------------------------------------------------------- the CLI, end to end


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lock_corpus")
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket"]):
        (folder / f"{name}.png").write_bytes(encode(photo((40, 32), name), "PNG"))
        os.utime(folder / f"{name}.png", (1_700_000_000 + i, 1_700_000_000 + i))
    return folder


def test_run_ids_and_latest_must_be_plain_names(corpus, tmp_path, capsys):
    root = tmp_path / "root"
    argv = ["nightly", "--input", str(corpus), "--root", str(root), *COMMON]
    assert main([*argv, "--run-id", "../outside"]) == 2  # a run folder is never a path out of runs/
    assert "run id '../outside' must be a plain name" in capsys.readouterr().err
    assert not (tmp_path / "outside").exists()
    claim(str(root), kind="root", what="--root")
    (root / "LATEST").write_text("../../etc\n")
    assert main([*argv, "--run-id", "r1"]) == 2
    assert f"{root}/LATEST holds '../../etc', not a run id; put the published run id in it" in capsys.readouterr().err
    assert not (root / "runs").exists()


HOLD_INSIDE_THE_LOCK = """
import sys
import pipeline.nightly as n
_run_embed = n.run_embed
def run_embed(*a, **k):
    print("HOLDING", flush=True)  # the run has started its work: a second run starts now
    sys.stdin.readline()
    return _run_embed(*a, **k)
n.run_embed = run_embed
"""


@pytest.mark.slow
def test_two_concurrent_nightly_runs_one_publishes_the_other_exits_4(corpus, tmp_path):
    root = tmp_path / "root"
    argv = ["nightly", "--input", str(corpus), "--root", str(root), *COMMON]  # default run ids: the UTC second
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = f"import sys\n{HOLD_INSIDE_THE_LOCK}\nfrom pipeline.cli import main\nsys.exit(main({argv!r}))\n"
    with open(tmp_path / "first.err", "w") as first_err:
        first = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=first_err, env=env
        )
        try:
            assert first.stdout.readline().strip() == b"HOLDING", (tmp_path / "first.err").read_text()[-3000:]
            second = subprocess.run(
                [sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True, env=env, timeout=300
            )
            assert second.returncode == 4, second.stderr[-3000:]
            refusal = [line for line in second.stderr.splitlines() if line.startswith("embedpipe nightly:")]
            assert len(refusal) == 1 and "Traceback" not in second.stderr
            assert f"another nightly run holds the lock on {root} (run " in refusal[0]
            assert f"pid {first.pid} on host {socket.gethostname()}, started " in refusal[0]
            assert "wait for it to finish" in refusal[0]
            first.stdin.write(b"\n")
            first.stdin.flush()
            assert first.wait(timeout=600) == 0, (tmp_path / "first.err").read_text()[-3000:]
        finally:
            if first.poll() is None:
                first.kill()
    runs = sorted(os.listdir(root / "runs"))
    assert len(runs) == 1 and read_latest(str(root)) == runs[0]  # one run folder, published once
    manifest = json.loads((root / "runs" / runs[0] / "manifest.json").read_text())
    assert manifest["published"] is True and manifest["counts"]["embedded"] == 4


@pytest.mark.slow
def test_an_older_run_finishing_last_never_moves_latest_back(corpus, tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"

    def nightly(run_id: str, *extra: str) -> int:
        return main(["nightly", "--input", str(corpus), "--root", str(root), "--run-id", run_id, *COMMON, *extra])

    real_validate = nightly_module.validate

    def validate_while_a_later_run_publishes(*args, **kwargs):
        monkeypatch.setattr(nightly_module, "validate", real_validate)
        # Without the lock (as on a root that cannot be locked), r3 starts and publishes while r2 validates.
        assert nightly("r3", "--no-lock") == 0
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(nightly_module, "validate", validate_while_a_later_run_publishes)
    assert nightly("r2", "--no-lock") == 3
    assert read_latest(str(root)) == "r3"
    err = capsys.readouterr().err
    assert "NOT published: run r2 is valid but LATEST already names r3, a later run published meanwhile" in err
    r2 = json.loads((root / "runs/r2/manifest.json").read_text())
    assert r2["validated"] is True and r2["published"] is False

    # A run id at or before LATEST is refused at the start, before any work.
    for run_id in ("r3", "r1"):
        assert nightly(run_id) == 2
        assert f"run id {run_id} sorts at or before the published LATEST run r3" in capsys.readouterr().err
    assert sorted(os.listdir(root / "runs")) == ["r2", "r3"] and read_latest(str(root)) == "r3"
