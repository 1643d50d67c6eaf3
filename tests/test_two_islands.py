"""A fit submitted with the real `ray job submit` command line to a real two-node Ray cluster on
this machine (island "a" on the head, island "b" on a worker with its own temp dir), checked from
MLflow: one parent run, three child runs, each expert on a node of its own island. Then
`archipelago submit` of the same settings finds the job and starts nothing new. And a fit
submitted by `archipelago submit --wait` itself: the job succeeds and leaves an assembled ensemble
that samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes

from archipelago.platform import sdk
from archipelago.platform.cli import main
from archipelago.platform.jobs import DEFAULT_EXCLUDES, wait_job
from archipelago.platform.status import run_status
from archipelago.platform.tracking import PARENT_TAG, TRACKING_ENV
from tests.cluster import RAY_CLI

ROOT = Path(__file__).resolve().parents[1]
ARCHIPELAGO = str(Path(sys.executable).with_name("archipelago"))
TINY = {"steps": 4, "batch_size": 16, "warmup_steps": 1, "progress": False}
JOB_TIMEOUT_S = 300


def settings_file(folder: Path) -> Path:
    path = folder / "two-islands.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(folder / "run"),
                "data": "sines:200",
                "experts": 2,
                "domain_config": {
                    "window": 8,
                    "width": 16,
                    "depth": 1,
                    "heads": 2,
                    "router_width": 16,
                    "router_depth": 1,
                },
                "expert": TINY,
                "router": TINY,
                "placement": [{"island": "a", "num_cpus": 1}, {"island": "b", "num_cpus": 1}],
                "router_placement": {"num_cpus": 1},
            }
        )
    )
    return path


def dry_run_submission_id(settings: Path, address: str, uri: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["submit", str(settings), "--address", address, "--tracking-uri", uri, "--dry-run"]) == 0
    plan = capsys.readouterr().out.split("# plan\n")[1]
    return next(line.split(": ", 1)[1] for line in plan.splitlines() if line.startswith("submission id: "))


@pytest.mark.cluster
def test_a_submitted_fit_trains_each_expert_on_its_island(tmp_path: Path, capsys, two_nodes) -> None:
    settings, uri = settings_file(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}"
    cluster = two_nodes
    submission_id = dry_run_submission_id(settings, cluster.dashboard_url, uri, capsys)
    runtime_env = {"env_vars": {TRACKING_ENV: uri}, "excludes": list(DEFAULT_EXCLUDES)}
    submit = [
        RAY_CLI,
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--no-wait",
        "--",
        ARCHIPELAGO,
        "fit",
        str(settings),
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    client = JobSubmissionClient(cluster.dashboard_url)
    status = wait_job(cluster.dashboard_url, submission_id, timeout_s=JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", client.get_job_logs(submission_id)[-6000:]

    islands = {}
    for node in list_nodes(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")]):
        islands.setdefault(node.labels.get("island"), set()).add(node.node_id)

    # A repeated submit of the same settings finds the job and starts nothing new.
    assert main(["submit", str(settings), "--address", cluster.dashboard_url, "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.strip() == submission_id
    assert [job.submission_id for job in client.list_jobs()].count(submission_id) == 1

    tracking = mlflow.MlflowClient(uri)
    runs = tracking.search_runs([e.experiment_id for e in tracking.search_experiments()])
    parents = [run for run in runs if PARENT_TAG not in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {
        run.info.run_name: run.data.tags for run in runs if run.data.tags.get(PARENT_TAG) == parents[0].info.run_id
    }
    assert sorted(children) == ["expert-0", "expert-1", "router"]
    for k, island in enumerate(("a", "b")):
        tags = children[f"expert-{k}"]
        assert tags["island"] == island and tags["node"] in islands[island], (tags, islands)


@pytest.mark.cluster
def test_archipelago_submit_wait_runs_a_fit_to_an_assembled_ensemble(tmp_path: Path, capsys, two_nodes) -> None:
    settings, uri = settings_file(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}"
    submit = ["submit", str(settings), "--address", two_nodes.dashboard_url, "--tracking-uri", uri]
    submit += ["--working-dir", str(ROOT), "--set", "expert.steps=10"]
    assert main([*submit, "--dry-run"]) == 0
    plan = capsys.readouterr().out.split("# plan\n")[1]
    submission_id = next(line.split(": ", 1)[1] for line in plan.splitlines() if line.startswith("submission id: "))

    code = main([*submit, "--wait", "--timeout", str(JOB_TIMEOUT_S)])
    logs = JobSubmissionClient(two_nodes.dashboard_url).get_job_logs(submission_id)[-6000:]
    assert code == 0, logs
    assert capsys.readouterr().out.splitlines() == [submission_id, f"job {submission_id}: SUCCEEDED"]

    run_dir = tmp_path / "run"
    ensemble = json.loads((run_dir / "ensemble.json").read_text())
    assert ensemble["experts"] == [["experts", f"expert-{k}", "step-00000010"] for k in range(2)]
    status = run_status(str(run_dir))
    assert [(e["island"], e["step"], e["state"]) for e in status["experts"]] == [("a", 10, "done"), ("b", 10, "done")]
    assert status["router"] == {"step": 4, "steps": 4, "state": "done", "writer": None} and status["assembled"] is True
    out = sdk.load(str(run_dir)).sample(4, strategy="top1", solver="euler", steps=2, seed=0)
    assert out.items.shape == (4, 8, 5) and np.isfinite(out.items).all()
    assert out.expert_calls_per_sample == 2
