"""One island's part of a fit and the assembly once every island is done, in this process: the
manifest records each expert's island and state, `assemble` refuses naming the experts not done,
an expert moves from a lost island to another (never from a live trainer), and a failed training
is recorded with its error. The same on real separate Ray clusters: tests/test_separate_clusters.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from archipelago.experts.lease import LEASE_FILE, LeaseHeld
from archipelago.platform import island_runs, manifest, sdk, steps
from archipelago.platform.cli import main
from archipelago.platform.config import RunConfig
from archipelago.platform.runner import Launch
from archipelago.platform.status import run_status
from archipelago.platform.tracking import PARENT_TAG
from tests.test_cli import SETTINGS as CLI_SETTINGS
from tests.test_cli import TINY

SETTINGS = {**CLI_SETTINGS, "placement": [{"island": "a"}, {"island": "b"}]}
HERE = Launch(ray=False, track=False)


def states(run_dir: Path) -> list[tuple[str | None, str]]:
    return [(e["island"], e["state"]) for e in run_status(str(run_dir))["experts"]]


def held_lease(folder: Path, expires_in: float) -> None:
    """A lease of a trainer on another machine (its pid cannot be checked from here)."""
    body = {"host": "island-a-node-7", "pid": 4242, "started": "2026-12-07T08:00:00+00:00",
            "expires": time.time() + expires_in, "purpose": "training expert 1", "token": "theirs"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LEASE_FILE).write_text(json.dumps(body))


def test_each_island_trains_its_experts_and_assemble_waits_for_all(tmp_path, capsys):
    config, run_dir = RunConfig(**SETTINGS), tmp_path / "run"
    result = island_runs.fit_island(config, str(run_dir), "a", HERE)
    assert [task["name"] for task in result.tasks] == ["expert-0"] and result.model_uri is None
    assert states(run_dir) == [("a", "done"), ("b", "pending")]
    record = manifest.read(str(run_dir), 0)
    assert (record["state"], record["island"], record["checkpoint"], record["step"]) == ("done", "a",
                                                                                       "step-00000004", 4)
    meta = json.loads((run_dir / "experts" / "expert-0" / "step-00000004" / "meta.json").read_text())
    assert record["data_fingerprint"] == meta["data_fingerprint"]  # of the expert's own partition

    assert main(["assemble", "--run-dir", str(run_dir)]) == 1
    error = capsys.readouterr().err
    assert "1 expert(s) not done: expert 1 (island b, pending, step 0 of 4)" in error
    assert not (run_dir / "ensemble.json").exists() and not (run_dir / "router").exists()

    island_runs.fit_island(config, str(run_dir), "b", HERE)  # the second island finds the run partitioned
    assert states(run_dir) == [("a", "done"), ("b", "done")]
    assert main(["assemble", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("router: 4 steps (resumed from 0)") and f"assembled {run_dir}" in out
    assert run_status(str(run_dir))["router"]["state"] == "done"
    samples = sdk.load(str(run_dir)).sample(4, strategy="top1", solver="euler", steps=2, seed=0)
    assert samples.items.shape == (4, 8, 5) and np.isfinite(samples.items).all()
    assert main(["assemble", "--run-dir", str(run_dir)]) == 0  # again: the router is reused, not retrained
    assert capsys.readouterr().out == f"assembled {run_dir}\n"


def test_an_expert_of_a_lost_island_moves_to_another_and_resumes_there(tmp_path):
    config, run_dir = RunConfig(**SETTINGS), tmp_path / "run"
    island_runs.fit_island(config, str(run_dir), "b", HERE)  # expert 1 trained to step 4 on island b
    grown = RunConfig(**{**SETTINGS, "expert": {**TINY, "steps": 6}})
    folder = Path(steps.expert_dir(str(run_dir), 1))
    manifest.write(str(run_dir), 1, "running", island="b")  # island b was training it when it died...
    held_lease(folder, expires_in=60)  # ...and its lease has not expired yet
    with pytest.raises(LeaseHeld, match="expert 1 cannot move to island a: .* training expert 1 .*island-a-node-7"):
        island_runs.fit_island(grown, str(run_dir), "a", HERE, experts=[1])
    assert manifest.read(str(run_dir), 1)["island"] == "b"

    held_lease(folder, expires_in=-1)  # expired: the trainer is gone
    assert states(run_dir)[1] == ("b", "interrupted")
    result = island_runs.fit_island(grown, str(run_dir), "a", HERE, experts=[1])
    assert [(task["name"], task["resumed_from"], task["steps"]) for task in result.tasks] == [("expert-1", 4, 6)]
    record = manifest.read(str(run_dir), 1)
    assert (record["island"], record["moved_from"], record["state"], record["step"]) == ("a", "b", "done", 6)


def test_a_failed_training_is_recorded_with_its_error(tmp_path, monkeypatch, capsys):
    config, run_dir = RunConfig(**SETTINGS), tmp_path / "run"

    def broken(*args, **kwargs):
        raise ArithmeticError("loss is nan at step 3")

    monkeypatch.setattr(steps, "train_expert", broken)
    with pytest.raises(ArithmeticError):
        island_runs.fit_island(config, str(run_dir), "a", HERE)
    record = manifest.read(str(run_dir), 0)
    assert (record["state"], record["error"]) == ("failed", "ArithmeticError: loss is nan at step 3")
    assert states(run_dir) == [("a", "failed"), ("b", "pending")]
    assert main(["assemble", "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "expert 0 (island a, failed, step 0 of 4: ArithmeticError: loss is nan at step 3)" in err
    assert main(["status", "--run-dir", str(run_dir)]) == 0
    assert "expert 0 failed: ArithmeticError: loss is nan at step 3" in capsys.readouterr().out


def test_island_flags_are_checked_before_any_work(tmp_path, capsys):
    settings = tmp_path / "run.yaml"
    settings.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **SETTINGS}))
    assert main(["fit", str(settings), "--in-process", "--no-tracking", "--expert", "1"]) == 2
    assert "--expert names experts to train on an island: give --island too" in capsys.readouterr().err
    assert main(["fit", str(settings), "--island", "c", "--in-process", "--no-tracking"]) == 1
    assert "is placed on island 'c' (islands by expert: {0: 'a', 1: 'b'})" in capsys.readouterr().err
    assert main(["fit", str(settings), "--island", "a", "--expert", "2", "--in-process", "--no-tracking"]) == 1
    assert "experts [2] do not exist: the run's experts are [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["fit", str(settings), "--island", "a", "--dry-run"]) == 0
    plan = capsys.readouterr().out.split("# plan\n")[1]
    assert "island a: check everything, ingest and partition unless another island did; train experts [0]" in plan


def test_an_assembly_tracked_apart_gets_a_parent_run_with_the_router_and_the_model(tmp_path, capsys):
    config, run_dir, uri = RunConfig(**SETTINGS), tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    for island in ("a", "b"):
        island_runs.fit_island(config, str(run_dir), island, HERE)
    assert main(["assemble", "--run-dir", str(run_dir), "--tracking-uri", uri, "--register", "islands"]) == 0
    out = capsys.readouterr().out
    assert "model: models:/islands/1" in out
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("archipelago").experiment_id])
    parent = next(run for run in runs if run.info.run_name == "assemble")
    assert parent.info.status == "FINISHED" and parent.data.tags["run_dir"] == str(run_dir)
    assert [run.info.run_name for run in runs if run.data.tags.get(PARENT_TAG) == parent.info.run_id] == ["router"]
