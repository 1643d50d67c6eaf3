"""Islands as separate Ray clusters on this machine (each its own head, GCS and dashboard, sharing
nothing but the run directory): a fit submitted with `archipelago submit --island` to each, then
`archipelago assemble` and `sample` in fresh processes; and an island killed mid-training, whose
expert resumes from its last checkpoint on a replacement cluster while the other island's expert
finishes untouched. The figures of the failure (steps lost, time to recover) are written to
$ARCHIPELAGO_FAULT_FIGURES when it is set (benchmarks/separate_clusters.py reads them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import yaml

from archipelago.platform import manifest
from archipelago.platform.cli import main
from archipelago.platform.jobs import wait_job
from archipelago.platform.status import run_status
from tests.cluster import LocalCluster, one_node_cluster

ARCHIPELAGO = str(Path(sys.executable).with_name("archipelago"))
TINY = {"steps": 10, "batch_size": 16, "warmup_steps": 1, "progress": False}
JOB_TIMEOUT_S = 300
FIGURES_ENV = "ARCHIPELAGO_FAULT_FIGURES"


def settings_file(folder: Path, islands: tuple[str, str], **changes) -> Path:
    settings = {
        "run_dir": str(folder / "run"),
        "data": "sines:200",
        "experts": 2,
        "domain_config": {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1},
        "expert": TINY,
        "router": {**TINY, "steps": 4},
        "placement": [{"island": island, "num_cpus": 1} for island in islands],
        **changes,
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def submit(settings: Path, island: str, cluster: LocalCluster, capsys, *extra: str) -> str:
    """`archipelago submit --island` to that island's cluster; the submission id."""
    args = ["submit", str(settings), "--island", island, "--address", cluster.dashboard_url, "--no-tracking"]
    assert main([*args, "--working-dir", str(settings.parent), *extra]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def fresh(*args: str) -> subprocess.CompletedProcess:
    """An archipelago command in a new process."""
    return subprocess.run([ARCHIPELAGO, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def separate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalCluster]]:
    """Two Ray clusters of one node each: island "a" and island "b"."""
    folder = tmp_path_factory.mktemp("separate")
    with ExitStack() as stack:
        yield {island: stack.enter_context(one_node_cluster(folder, island)) for island in ("a", "b")}


@pytest.mark.cluster
def test_a_fit_across_two_separate_clusters_assembles_and_samples(tmp_path, capsys, separate) -> None:
    settings = settings_file(tmp_path, ("a", "b"))
    jobs = {island: submit(settings, island, separate[island], capsys) for island in ("a", "b")}
    assert jobs["a"] != jobs["b"]  # the island is part of what a submission is
    for island, job in jobs.items():
        assert wait_job(separate[island].dashboard_url, job, JOB_TIMEOUT_S) == "SUCCEEDED"
    assert submit(settings, "a", separate["a"], capsys) == jobs["a"]  # succeeded: not trained twice

    run_dir = tmp_path / "run"
    records = {k: manifest.read(str(run_dir), k) for k in (0, 1)}
    assert [(r["island"], r["state"], r["step"]) for r in records.values()] == [("a", "done", 10), ("b", "done", 10)]
    assert not (run_dir / "ensemble.json").exists()

    assembled = fresh("assemble", "--run-dir", str(run_dir))
    assert assembled.returncode == 0, assembled.stderr
    sampled = fresh("sample", "--run-dir", str(run_dir), "-n", "8", "--steps", "2", "--out", str(tmp_path / "x.npy"))
    assert sampled.returncode == 0, sampled.stderr
    samples = np.load(tmp_path / "x.npy")
    assert samples.shape[0] == 8 and np.isfinite(samples).all()
    status = run_status(str(run_dir))
    assert [(e["island"], e["state"]) for e in status["experts"]] == [("a", "done"), ("b", "done")]
    assert status["router"]["state"] == "done" and status["assembled"]


@pytest.mark.cluster
def test_a_killed_island_loses_at_most_one_checkpoint_interval(tmp_path, capsys, separate) -> None:
    every = 50
    settings = settings_file(tmp_path, ("c", "b"), expert={**TINY, "steps": 1500, "checkpoint_every": every})
    run_dir, figures = tmp_path / "run", {"checkpoint_every": every}
    expert_b = run_dir / "experts" / "expert-1"
    with one_node_cluster(tmp_path / "first", "c") as island_c:
        job_c = submit(settings, "c", island_c, capsys)
        job_b = submit(settings, "b", separate["b"], capsys)
        checkpoint, seen, pace = wait_for_checkpoint(run_dir / "experts" / "expert-0", 2 * every)
        time.sleep(every / 2 / pace)  # the island dies halfway to its next checkpoint
        island_c.kill()
        killed = time.monotonic()
        trainer = manifest.read(str(run_dir), 0)
        wait_until_dead(trainer["pid"])
    at_kill = latest_step(run_dir / "experts" / "expert-0")  # the checkpoint to resume from
    assert at_kill - checkpoint <= every  # a kill between our look and the signal may see one more
    assert run_status(str(run_dir))["experts"][0]["state"] == "interrupted"
    assert wait_job(separate["b"].dashboard_url, job_b, JOB_TIMEOUT_S) == "SUCCEEDED"  # untouched by the loss
    assert manifest.read(str(run_dir), 1)["state"] == "done"
    expert_b_files = checksums(expert_b)
    figures |= {"latest_checkpoint_at_kill": at_kill, "pace_steps_per_s": round(pace, 1),
                "steps_lost_estimate": round(pace * (killed - seen) - (at_kill - checkpoint))}

    with one_node_cluster(tmp_path / "replacement", "c") as replacement:
        started = time.monotonic()
        assert submit(settings, "c", replacement, capsys) == job_c  # a new cluster: the same submission id
        resumed = wait_for_record(run_dir, 0, lambda r: r["state"] == "running" and r["pid"] != trainer["pid"])
        assert wait_job(replacement.dashboard_url, job_c, JOB_TIMEOUT_S) == "SUCCEEDED"
        done = time.monotonic()
        logs = job_logs(replacement, job_c)
    assert f"(resumed from {at_kill})" in logs, logs[-3000:]
    assert checksums(expert_b) == expert_b_files  # island b's expert was not touched again
    record = manifest.read(str(run_dir), 0)
    assert (record["state"], record["step"], record["island"]) == ("done", 1500, "c")
    figures |= {"killed_to_replacement_s": round(started - killed, 1),
                "resubmit_to_resumed_s": round(resumed - started, 1), "resubmit_to_done_s": round(done - started, 1)}
    if os.environ.get(FIGURES_ENV):
        Path(os.environ[FIGURES_ENV]).write_text(json.dumps(figures, indent=2))


def latest_step(folder: Path) -> int | None:
    latest = folder / "LATEST"
    return int(latest.read_text().strip().split("-")[-1]) if latest.exists() else None


def wait_for_checkpoint(folder: Path, step: int, timeout_s: float = 240) -> tuple[int, float, float]:
    """Wait until the expert's latest checkpoint is at `step` or later: (its step, when it was seen,
    the trainer's pace in steps per second between its last two checkpoints)."""
    deadline, seen = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        current = latest_step(folder)
        if current is not None and current not in seen:
            seen[current] = time.monotonic()
        if current is not None and current >= step and len(seen) >= 2:
            (a, ta), (b, tb) = sorted(seen.items())[-2:]
            return b, tb, (b - a) / (tb - ta)
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint at step {step} in {folder} after {timeout_s} s")


def wait_until_dead(pid: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the trainer (pid {pid}) of the killed island still runs after {timeout_s} s")


def wait_for_record(run_dir: Path, k: int, condition, timeout_s: float = 240) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = manifest.read(str(run_dir), k)
        if record and condition(record):
            return time.monotonic()
        time.sleep(0.1)
    raise TimeoutError(f"expert {k}'s record never met the condition: {manifest.read(str(run_dir), k)}")


def checksums(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): hash(p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lease"}


def job_logs(cluster: LocalCluster, job: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url).get_job_logs(job)
