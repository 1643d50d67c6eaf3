"""Fault tolerance of a fit on Ray: SIGKILL of one training expert's worker mid-training.

A watcher thread waits until expert 0 has its first checkpoint (experts/expert-0/LATEST), finds
the Ray worker that trains it among this process's descendants (Ray titles a busy worker
`ray::<task name>`) and kills it with SIGKILL. Ray retries the task; the retry resumes from the
latest checkpoint. The fit must complete, expert 0's log must say it resumed, expert 1 must have
trained exactly once, and expert 0's final weights must equal those of an uninterrupted training.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import psutil
import torch
from safetensors.torch import load_file

from archipelago.platform import steps
from archipelago.platform.config import RunConfig
from archipelago.platform.runner import Launch, fit

STEPS, EVERY = 80, 10
CONFIG = RunConfig(
    domain="timeseries",
    data="sines:300",
    experts=2,
    domain_config={"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1},
    expert={
        "steps": STEPS,
        "batch_size": 8,
        "warmup_steps": 5,
        "checkpoint_every": EVERY,
        "log_every": EVERY,
        "progress": False,
        "device": "cpu",
    },
    router={"steps": 4, "batch_size": 8, "warmup_steps": 2, "progress": False, "device": "cpu"},
)


def kill_expert_after_first_checkpoint(
    latest: Path, task_name: str, found: dict[str, Any], timeout_s: float = 400.0
) -> None:
    """Wait for `latest`, then SIGKILL the worker titled `ray::<task_name>` (a descendant of this
    process, so no other Ray instance on the machine is touched); record what was done in `found`."""
    deadline = time.monotonic() + timeout_s
    while not latest.exists():
        if time.monotonic() > deadline:
            found["error"] = f"{latest} never appeared"
            return
        time.sleep(0.02)
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] == [f"ray::{task_name}"]:
                found["log"] = os.readlink(f"/proc/{process.pid}/fd/2")  # the worker's worker-*.err
                found["checkpoint"] = latest.read_text().strip()
                os.kill(process.pid, signal.SIGKILL)
                found["pid"] = process.pid
                return
        except (psutil.Error, OSError):
            continue
    found["error"] = f"no running worker titled ray::{task_name} once {latest} appeared"


def child_runs(uri: str, parent_id: str) -> dict[str, list[mlflow.entities.Run]]:
    """The parent's child runs, by run name."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_run(parent_id).info.experiment_id
    runs: dict[str, list[mlflow.entities.Run]] = {}
    for run in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'"):
        runs.setdefault(run.info.run_name, []).append(run)
    return runs


def uninterrupted_expert_weights(run_dir: Path, copy: Path, k: int) -> dict[str, torch.Tensor]:
    """Expert k trained again in this process, in one go, on a copy of the run's data."""
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("experts", "router", "ensemble.json"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray worker (one CPU), so the float sums run in the same order
    try:
        result = steps.train_expert_step(str(copy), k)
    finally:
        torch.set_num_threads(threads)
    return load_file(Path(result.checkpoint, "model.safetensors"))


def test_sigkilled_expert_resumes_from_its_checkpoint_and_the_other_trains_once(ray_local, tmp_path):
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    found: dict[str, Any] = {}
    watcher = threading.Thread(
        target=kill_expert_after_first_checkpoint,
        args=(run_dir / "experts" / "expert-0" / "LATEST", "expert-0", found),
        daemon=True,
    )
    watcher.start()
    result = fit(CONFIG, str(run_dir), launch=Launch(tracking_uri=uri, experiment="fault-tolerance"))
    watcher.join(timeout=5)
    assert "pid" in found, found.get("error")

    expert0, expert1 = (next(t for t in result.tasks if t["name"] == f"expert-{k}") for k in (0, 1))
    # Expert 0 was killed mid-training and its retry, in another worker, resumed from a checkpoint.
    resumed = expert0["resumed_from"]
    assert expert0["pid"] != found["pid"]
    assert resumed % EVERY == 0 and int(found["checkpoint"].split("-")[1]) <= resumed < STEPS
    assert expert0["steps"] == STEPS and Path(expert0["checkpoint"]).name == f"step-{STEPS:08d}"
    killed_log = Path(found["log"]).read_text()
    assert re.search(rf"expert-0 starting on node \S+ \(island None, pid {found['pid']}\)", killed_log)
    assert "expert-0 resumed" not in killed_log
    [retry_log] = Path(found["log"]).parent.glob(f"worker-*-{expert0['pid']}.err")
    assert f"expert-0 resumed from checkpoint step {resumed}" in retry_log.read_text()
    # Expert 1 trained exactly once: no resume, one child run, each logged step once.
    assert expert1["resumed_from"] == 0
    runs = child_runs(uri, result.parent_run_id)
    [run1] = runs["expert-1"]
    assert run1.info.status == "FINISHED" and run1.data.tags["resumed_from"] == "0"
    history = mlflow.MlflowClient(uri).get_metric_history(run1.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(EVERY, STEPS + 1, EVERY))
    # The retry reopened expert 0's child run (one run, finished) and it carries the resume; it
    # logged every step after the checkpoint (what the killed attempt still had buffered is lost).
    [run0] = runs["expert-0"]
    assert run0.info.status == "FINISHED" and run0.data.tags["resumed_from"] == str(resumed)
    logged = {m.step for m in mlflow.MlflowClient(uri).get_metric_history(run0.info.run_id, "loss")}
    assert set(range(resumed + EVERY, STEPS + 1, EVERY)) <= logged <= set(range(EVERY, STEPS + 1, EVERY))
    assert mlflow.MlflowClient(uri).get_run(result.parent_run_id).info.status == "FINISHED"
    assert result.model_uri and (run_dir / "ensemble.json").exists()
    # Resume is exact: the same weights as training expert 0 in one go.
    final = load_file(Path(expert0["checkpoint"], "model.safetensors"))
    again = uninterrupted_expert_weights(run_dir, tmp_path / "again", 0)
    assert final.keys() == again.keys()
    assert all(torch.equal(final[name], again[name]) for name in final)
