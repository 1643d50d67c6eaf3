"""An expert across an island: data-parallel training (DDP) in `run_training`, and through Ray Train.

Without Ray: two processes (gloo over a file store) must end with the same weights as each other
and as one process that takes the same global batches, and resuming them must be exact. With Ray
Train on the embedded Ray: a 2-worker expert trains, checkpoints, records itself done, and resumes;
a worker killed with SIGKILL restarts the workers from the latest checkpoint.
"""

from __future__ import annotations

import threading
from pathlib import Path

import mlflow
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from archipelago.experts.checkpoint import latest_checkpoint, load_checkpoint, step_folders
from archipelago.platform import manifest, runner, steps, tracking
from archipelago.platform.config import RunConfig
from archipelago.platform.runner import Launch
from archipelago.platform.tasks import TrackingTarget
from tests.data_parallel_ranks import train_ranks, train_regression
from tests.test_fault_tolerance import kill_expert_after_first_checkpoint

# --- DDP without Ray ------------------------------------------------------------------------------


def test_two_ranks_average_gradients_and_resume_exactly(tmp_path):
    torch.multiprocessing.spawn(train_ranks, args=(2, tmp_path), nprocs=2)
    ranks = [load_file(tmp_path / f"regression-{rank}.safetensors") for rank in range(2)]
    single = train_regression(str(tmp_path / "single")).state_dict()
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # DDP keeps the ranks in step
        torch.testing.assert_close(ranks[0][name], value, rtol=0, atol=1e-12)  # averaged = the global batch's
    # Rank 0 alone wrote the checkpoints, holding rank 1's noise stream: resuming on 2 ranks is exact.
    straight, resumed = (load_checkpoint(latest_checkpoint(str(tmp_path / name))) for name in ("straight", "resumed"))
    assert "rng.noise.rank1" in straight.state and step_folders(str(tmp_path / "straight")) == [
        "step-00000002", "step-00000004"]
    assert straight.model.keys() == resumed.model.keys() and straight.state.keys() == resumed.state.keys()
    for part in ("model", "state"):
        for name, value in getattr(straight, part).items():
            assert torch.equal(value, getattr(resumed, part)[name]), name


# --- configuration --------------------------------------------------------------------------------

TINY = {"data": "sines:200", "experts": 2,
        "domain_config": {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1}}


def run_config(steps: int, **changes) -> RunConfig:
    return RunConfig(**TINY | {"expert": {"steps": steps, "batch_size": 16, "warmup_steps": 1, "progress": False,
                                          "checkpoint_every": 2, "log_every": 2, "device": "cpu"},
                               "placement": [{"workers": 2}, {}]} | changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"placement": [{"workers": 3}, {}]}, r"placement\.0\.workers=3 does not divide expert\.batch_size=16"),
    ({"placement": [{}, {"workers": 2, "num_gpus": 0.5}]}, r"placement\.1\.num_gpus=0\.5: .* a whole GPU each"),
    ({"router_placement": {"workers": 2}}, r"router_placement\.workers: the router trains on one worker"),
])
def test_placements_that_cannot_split_the_work_are_refused(changes, message):
    with pytest.raises(ValidationError, match=message):
        run_config(4, **changes)


# --- Ray Train on the embedded Ray ------------------------------------------------------------------


def test_an_expert_on_two_workers_trains_records_itself_and_resumes(ray_local, tmp_path):
    launch, uri = Launch(track=False), f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = runner.prepare(run_config(4), tmp_path / "run", launch)
    target = TrackingTarget(uri, tracking.start_parent(uri, "data-parallel", {}, run_dir))
    [report] = runner.train_parts(run_config(4), run_dir, target, launch, experts={0: None}, router=False)
    assert (report["name"], report["steps"], report["resumed_from"]) == ("expert-0", 4, 0)
    folder = steps.expert_dir(run_dir, 0)
    assert step_folders(folder) == ["step-00000002", "step-00000004"]
    assert "rng.noise.rank1" in load_checkpoint(report["checkpoint"]).state  # two ranks trained it
    assert (manifest.read(run_dir, 0)["state"], manifest.read(run_dir, 0)["step"]) == ("done", 4)

    runner.prepare(run_config(6), run_dir, launch)
    [report] = runner.train_parts(run_config(6), run_dir, target, launch, experts={0: None}, router=False)
    assert (report["steps"], report["resumed_from"]) == (6, 4)
    assert (manifest.read(run_dir, 0)["state"], manifest.read(run_dir, 0)["step"]) == ("done", 6)
    # One child run, rank 0's metrics, each logged step once.
    client = mlflow.MlflowClient(uri)
    experiment = client.get_run(target.parent_id).info.experiment_id
    [child] = client.search_runs([experiment], "attributes.run_name = 'expert-0'")
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "loss")) == [2, 4, 6]


def test_a_killed_worker_restarts_the_workers_from_the_latest_checkpoint(ray_local, tmp_path):
    steps_, every = 200, 5
    config = run_config(steps_, expert={"steps": steps_, "batch_size": 16, "warmup_steps": 1, "progress": False,
                                        "checkpoint_every": every, "log_every": 50, "device": "cpu"})
    launch, found = Launch(track=False), {}
    run_dir = runner.prepare(config, tmp_path / "run", launch)
    latest = Path(steps.expert_dir(run_dir, 0), "LATEST")
    watcher = threading.Thread(target=kill_expert_after_first_checkpoint, args=(latest, "RayTrainWorker", found),
                               daemon=True)
    watcher.start()
    [report] = runner.train_parts(config, run_dir, None, launch, experts={0: None}, router=False)
    watcher.join(timeout=5)
    assert "pid" in found, found.get("error")
    assert report["steps"] == steps_ and report["pid"] != found["pid"]
    assert int(found["checkpoint"].split("-")[1]) <= report["resumed_from"] < steps_
    assert report["resumed_from"] % every == 0
    assert (manifest.read(run_dir, 0)["state"], manifest.read(run_dir, 0)["step"]) == ("done", steps_)
