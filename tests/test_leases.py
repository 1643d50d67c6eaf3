"""Leases on the run directory: one writer at a time, the holder named, --wait, stale leases of dead
or silent holders taken over, S3's conditional writes, and N fits started at the same instant."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from archipelago.experts import lease
from archipelago.experts.lease import LEASE_FILE, Lease, LeaseHeld, holder


def _lease_file(folder: Path, **fields) -> None:
    """A lease written by someone else."""
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00+00:00",
            "expires": time.time() + 60, "purpose": "archipelago fit", "token": "theirs"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LEASE_FILE).write_text(json.dumps(mine | fields))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_held_lease_is_refused_naming_its_holder_and_released_after(tmp_path):
    with Lease(str(tmp_path / "run"), "archipelago fit"):
        found = holder(str(tmp_path / "run"))
        assert (found.pid, found.purpose) == (os.getpid(), "archipelago fit")
        _lease_file(tmp_path / "other", pid=1)  # pid 1 lives: a live holder
        with pytest.raises(LeaseHeld, match=rf"other is in use by archipelago fit \(pid 1 on {socket.gethostname()}"):
            Lease(str(tmp_path / "other"), "archipelago fit").__enter__()
    assert holder(str(tmp_path / "run")) is None
    assert not (tmp_path / "run").exists()  # the lease made the folder and leaves no empty one behind


def test_the_same_process_may_nest_a_lease_it_holds(tmp_path):
    with Lease(str(tmp_path), "fit"), Lease(str(tmp_path), "partition"):
        assert holder(str(tmp_path)).purpose == "fit"
    assert holder(str(tmp_path)) is None


def test_wait_takes_the_lease_when_its_holder_lets_go(tmp_path):
    _lease_file(tmp_path, pid=1)
    threading.Timer(0.5, (tmp_path / LEASE_FILE).unlink).start()
    with pytest.raises(LeaseHeld):
        Lease(str(tmp_path), "fit", wait=0.1, poll_s=0.05).__enter__()
    with Lease(str(tmp_path), "fit", wait=True, poll_s=0.05):
        assert holder(str(tmp_path)).pid == os.getpid()


@pytest.mark.parametrize("stale", [{"pid": "dead"}, {"host": "elsewhere", "pid": 1, "expires": 0.0}])
def test_a_stale_lease_is_taken_over(tmp_path, stale, caplog):
    _lease_file(tmp_path, **{**stale, "pid": _dead_pid() if stale["pid"] == "dead" else stale["pid"]})
    with Lease(str(tmp_path), "fit"):
        assert holder(str(tmp_path)).pid == os.getpid()
    assert "took over the stale lease of archipelago fit" in caplog.text


def test_a_live_holder_on_another_host_is_waited_for_until_its_lease_expires(tmp_path):
    _lease_file(tmp_path, host="elsewhere", pid=1, expires=time.time() + 0.6)
    start = time.monotonic()
    with Lease(str(tmp_path), "fit", wait=5, poll_s=0.05):
        assert time.monotonic() - start >= 0.5


def test_the_heartbeat_keeps_a_long_step_s_lease_alive(tmp_path):
    with Lease(str(tmp_path), "fit", ttl_s=0.3):
        first = holder(str(tmp_path)).expires
        time.sleep(0.8)
        renewed = holder(str(tmp_path))
        assert renewed.expires > first + 0.3 and not renewed.stale(time.time())


def test_racing_takers_of_one_stale_lease_end_with_one_holder(tmp_path):
    _lease_file(tmp_path, host="elsewhere", pid=1, expires=0.0)
    store = lease._store(str(tmp_path))
    stale = store.read()[1]
    won = [store.take_over(stale, json.dumps({"token": f"taker-{i}"}).encode()) for i in range(3)]
    assert sum(w is not None for w in won) == 1
    assert not any(name.startswith(f"{LEASE_FILE}.") for name in os.listdir(tmp_path))  # markers removed


def test_leases_on_s3_use_conditional_writes(monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    def theirs(**fields) -> None:
        client.put_object(Bucket="leases", Key="run/.lease", Body=json.dumps(
            {"host": "elsewhere", "pid": 1, "started": "x", "expires": time.time() + 60, "purpose": "old fit",
             "token": "t"} | fields))

    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="leases")
        theirs()
        with pytest.raises(LeaseHeld, match=r"s3://leases/run is in use by old fit \(pid 1 on elsewhere"):
            Lease("s3://leases/run", "fit").__enter__()
        theirs(expires=0.0)  # stale: taken over with a conditional overwrite
        with Lease("s3://leases/run", "fit", ttl_s=0.3):
            time.sleep(0.5)  # renewed with If-Match on its own ETag
            assert holder("s3://leases/run").purpose == "fit"
        assert holder("s3://leases/run") is None


def test_other_object_stores_warn_that_they_hold_no_lease(caplog):
    with Lease("gs://bucket/run", "fit"):
        assert holder("gs://bucket/run") is None
    assert "gs://bucket/run: no lease (gs:// has no conditional writes here)" in caplog.text


# --- N fits at the same instant -------------------------------------------------------------------

SETTINGS = """\
data: sines:48
experts: 2
seed: {seed}
domain_config: {{window: 8, stride: 8, width: 16, depth: 1, router_width: 16, router_depth: 1}}
expert: {{steps: 4, batch_size: 16, warmup_steps: 1, checkpoint_every: 2, progress: false}}
router: {{steps: 4, batch_size: 16, warmup_steps: 1, checkpoint_every: 2, progress: false}}
"""

# Imports first, then every process calls the command line when the test says go (all at once).
RACER = """
import sys
from archipelago.platform.cli import main
print("ready", flush=True)
sys.stdin.readline()
sys.exit(main(sys.argv[1:]))
"""


def _race(tmp_path: Path, run_dir: Path, seeds: list[int], wait: bool) -> list[subprocess.CompletedProcess]:
    """One `archipelago fit` per seed into `run_dir`, all calling in at the same instant."""
    racers = []
    for i, seed in enumerate(seeds):
        settings = tmp_path / f"settings-{i}.yaml"
        settings.write_text(SETTINGS.format(seed=seed))
        argv = ["fit", str(settings), "--run-dir", str(run_dir), "--in-process", "--no-tracking",
                *(["--wait"] if wait else [])]
        racers.append(subprocess.Popen([sys.executable, "-c", RACER, *argv], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    for racer in racers:
        assert racer.stdout.readline() == "ready\n"
    for racer in racers:
        racer.stdin.write("go\n")
        racer.stdin.flush()
    done = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(racer.args, racer.returncode, out, err))
    return done


def _checkpoints(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "experts").rglob("*.safetensors"))}


def test_fits_started_at_the_same_instant_one_trains_the_others_fail_or_wait(tmp_path):
    run_dir = tmp_path / "run"
    first = _race(tmp_path, run_dir, [0, 0, 1], wait=False)  # two of the same run, one of another
    assert sorted(d.returncode for d in first) == [0, 1, 1], [d.stderr[-400:] for d in first]
    for failed in (d for d in first if d.returncode == 1):
        assert failed.stderr.count("\n") == 1, failed.stderr  # one line, no traceback
        assert ("is in use by archipelago fit (pid" in failed.stderr
                or failed is first[2] and "already holds a different run (differs in seed)" in failed.stderr)
    winner = next(d for d in first if d.returncode == 0)
    assert "expert-0: 4 steps (resumed from 0)" in winner.stdout
    seed = 1 if winner is first[2] else 0
    assert json.loads((run_dir / "run.json").read_text())["config"]["seed"] == seed
    trained = _checkpoints(run_dir)

    second = _race(tmp_path, run_dir, [seed, seed, 1 - seed], wait=True)
    for d in second[:2]:  # waited, then found the run done: nothing is trained twice
        assert d.returncode == 0, d.stderr[-400:]
        assert "expert-0: 4 steps (resumed from 4)" in d.stdout and "router: 4 steps (resumed from 4)" in d.stdout
    assert second[2].returncode == 1 and "already holds a different run (differs in seed)" in second[2].stderr
    assert _checkpoints(run_dir) == trained  # no checkpoint was overwritten
    assert not (run_dir / LEASE_FILE).exists()


def test_status_names_the_writers_of_a_run(tmp_path):
    import numpy as np

    from archipelago.platform import sdk, steps
    from archipelago.platform.status import run_status, status_text
    from tests.toy_domains import VectorDomain

    tiny = {"steps": 2, "batch_size": 8, "warmup_steps": 1, "progress": False}
    run = sdk.fit(np.random.default_rng(0).normal(size=(32, 2)), str(tmp_path / "run"), domain=VectorDomain(),
                  experts=2, expert=tiny, router=tiny)
    assert run_status(run.run_dir)["writer"] is None
    _lease_file(Path(steps.expert_dir(run.run_dir, 1)), pid=1, purpose="training expert 1")
    with Lease(run.run_dir, "archipelago fit"):
        status = run_status(run.run_dir)
        assert status["writer"].startswith(f"archipelago fit (pid {os.getpid()}")
        assert [e["writer"] for e in status["experts"]][0] is None
        assert "expert 1: training expert 1 (pid 1" in status_text(status)
