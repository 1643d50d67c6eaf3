"""MLflow tracking: parent and child runs, batched metrics, the ensemble as a pyfunc model, Ray workers.

Everything writes to a SQLite store in a temporary folder; the run is a tiny real fit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import tracking_tasks

from archipelago.platform import sdk, tracking
from archipelago.platform.islands import TaskSpec, submit_tasks
from archipelago.platform.mlflow_model import parse_request
from archipelago.router.sampling import SampleRequest

TINY = {"steps": 4, "batch_size": 16, "warmup_steps": 1, "progress": False}
DOMAIN = {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1}
FIT_METRICS = {"loss", "lr", "samples_per_s", "wall_time"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('tracking')}/mlflow.db"
    tracking.check_tracking(uri)
    return uri


@pytest.fixture(scope="module")
def client(store) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(store)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> sdk.Run:
    """A tiny real fit (in this process, not tracked)."""
    run_dir = tmp_path_factory.mktemp("runs") / "sines"
    return sdk.fit("sines:200", str(run_dir), experts=2, expert=TINY, router=TINY, domain_config=DOMAIN)


@pytest.fixture(scope="module")
def parent(store, fitted) -> str:
    config = fitted.config.model_dump(mode="json")
    return tracking.start_parent(store, "tests", config, fitted.run_dir, run_name="sines")


def status(client: mlflow.MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.status


def test_parent_logs_the_flattened_config_and_tags(client, fitted, parent):
    data = client.get_run(parent).data
    assert data.params["expert.steps"] == "4"
    assert data.params["domain_config.window"] == "8"
    assert data.params["experts"] == "2"
    assert data.params["placement"] == "null"
    assert data.params["router.progress"] == "false"
    assert data.tags["run_dir"] == fitted.run_dir
    assert data.tags["domain"] == "timeseries" and data.tags["experts"] == "2"
    assert data.tags["mlflow.runName"] == "sines"
    assert "config.json" in [a.path for a in client.list_artifacts(parent)]


def test_flatten_params_keeps_lists_and_respects_mlflow_limits():
    flat = tracking.flatten_params({"a": {"b": [{"c": 1}, {"c": None}]}, "d": {}, "e": "x" * 7000})
    assert flat == {"a.b.0.c": "1", "a.b.1.c": "null", "d": "{}", "e": "x" * tracking.MAX_PARAM_VALUE}


def test_child_runs_are_linked_to_their_parent(store, client, parent):
    children = []
    for k in range(2):
        with tracking.ChildRun(store, parent, f"expert-{k}", {"expert": k, "island": None, "partition_size": 100}) as c:
            c.set_tags({"node": "n1", "data_fingerprint": "abc"})
            children.append(c.run_id)
    experiment = client.get_run(parent).info.experiment_id
    found = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in found) == sorted(children)
    tags = client.get_run(children[1]).data.tags
    assert tags["expert"] == "1" and tags["node"] == "n1" and tags["partition_size"] == "100"
    assert "island" not in tags  # None is left out, not written as "None"
    assert {r.info.run_name for r in found} == {"expert-0", "expert-1"}


def test_metrics_are_batched_and_keep_their_steps(store, client, parent, tmp_path):
    """ChildRun.log is the training's on_log(step, metrics) callback."""
    with tracking.ChildRun(store, parent, "router", {}, flush_every=3) as child:
        for step in range(1, 8):
            child.log(step * 10, {"loss": 1.0 / step, "lr": 1e-3, "samples_per_s": 100.0, "wall_time": step})
            if step == 4:  # three calls went out as one batch, the fourth waits in the buffer
                assert [m.step for m in client.get_metric_history(child.run_id, "loss")] == [10, 20, 30]
        (tmp_path / "samples.txt").write_text("0.1 0.2")
        child.log_artifact(tmp_path / "samples.txt", "samples")
        child.log_dict({"k": 1}, "extra/config.json")
    history = client.get_metric_history(child.run_id, "loss")
    assert [m.step for m in history] == [10, 20, 30, 40, 50, 60, 70]
    assert history[-1].value == pytest.approx(1 / 7)
    assert set(client.get_run(child.run_id).data.metrics) == FIT_METRICS  # as training's on_log sends
    assert status(client, child.run_id) == "FINISHED"
    assert {a.path for a in client.list_artifacts(child.run_id)} == {"samples", "extra"}
    assert mlflow.active_run() is None  # nothing leaks into MLflow's fluent (process-wide) state


def test_a_failure_inside_a_child_run_marks_it_failed(store, client, parent):
    with pytest.raises(RuntimeError, match="boom"), tracking.ChildRun(store, parent, "expert-9", {}) as child:
        child.log(1, {"loss": 2.0})
        raise RuntimeError("boom")
    assert status(client, child.run_id) == "FAILED"
    assert [m.value for m in client.get_metric_history(child.run_id, "loss")] == [2.0]
    assert mlflow.active_run() is None


def test_the_ensemble_model_loads_and_samples_in_a_new_process(store, client, fitted, parent, tmp_path):
    run = fitted
    before = (mlflow.get_tracking_uri(), os.environ.get(tracking.TRACKING_ENV))
    logged = tracking.log_ensemble_model(store, parent, run.run_dir)
    registered = tracking.log_ensemble_model(store, parent, run.run_dir, registered_name="sines-ensemble")
    assert logged.startswith("models:/m-") and registered == "models:/sines-ensemble/1"
    model = client.get_logged_model(logged.removeprefix("models:/"))
    assert model.source_run_id == parent
    assert model.experiment_id == client.get_run(parent).info.experiment_id
    copy = Path(model.artifact_location.removeprefix("file://"), "artifacts", "run")
    files = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
    assert {"run.json", "domain.json", "partition.json", "ensemble.json"} <= files
    assert not [f for f in files if f.endswith("state.safetensors") or f.startswith(("records", "data"))]
    assert len([f for f in files if f.endswith("model.safetensors")]) == 3  # 2 experts and the router
    code = (
        "import json, sys, mlflow\n"
        "shapes = [list(mlflow.pyfunc.load_model(u).predict({'n': 4, 'strategy': 'top1', 'steps': 2}).shape)"
        " for u in sys.argv[1:]]\n"
        "print(json.dumps(shapes))"
    )
    env = {**os.environ, tracking.TRACKING_ENV: store}
    out = subprocess.run(
        [sys.executable, "-c", code, logged, registered],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    channels = len(run.domain.scaler.columns)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[4, 8, channels], [4, 8, channels]]
    assert (mlflow.get_tracking_uri(), os.environ.get(tracking.TRACKING_ENV)) == before  # restored
    assert mlflow.active_run() is None


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"n": 2, "strategy": "best"}, "strategy: .*'full'.*got 'best'"),
        ({"n": 2, "temperature": 1}, "temperature: unknown key"),
        ({"strategy": "top1"}, "needs n"),
        ({"n": 2.5}, "n: .*integer.*got 2.5"),
        ({"n": 2, "solver": "rk45"}, "unknown solver 'rk45'"),
        ({"n": 2, "guidance": "strong"}, "guidance: .*number.*got 'strong'"),
    ],
)
def test_a_bad_request_names_the_bad_key_or_value(request_, message):
    with pytest.raises(ValueError, match=message):
        parse_request(request_)


def test_a_request_gets_defaults_and_may_be_a_one_row_frame():
    import pandas as pd

    expected = SampleRequest(n=3)
    assert parse_request({"n": 3}) == expected
    assert parse_request(pd.DataFrame([{"n": 3, "strategy": "sample"}])) == expected
    assert parse_request({"n": np.int64(3)}, params={"guidance": 2}) == SampleRequest(n=3, guidance=2.0)


def test_an_unreachable_tracking_server_fails_fast():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free, and closed again when the block ends
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        tracking.check_tracking(uri)


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    """A real `mlflow server` (SQLite backend, one worker) on a free port; stopped by its PID."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db"]
    server = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"{uri}/health"):
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def test_a_real_mlflow_server_passes_the_check(mlflow_server):
    tracking.check_tracking(mlflow_server)
    tracking.check_tracking(mlflow_server + "/")  # a trailing slash is the same server


def test_the_default_tracking_uri_is_mlflows_sqlite_file_made_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.TRACKING_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_tracking_uri("sqlite:///sub/t.db") == f"sqlite:///{tmp_path}/sub/t.db"
    monkeypatch.setenv(tracking.TRACKING_ENV, "http://tracking.example:5000")
    assert tracking.resolve_tracking_uri(None) == "http://tracking.example:5000"
    tracking.check_tracking("sqlite:///sub/deeper/t.db")  # a missing folder is created
    assert (tmp_path / "sub" / "deeper").is_dir()


def test_a_reused_ray_worker_starts_each_child_run_clean(ray_local, store, client, parent):
    def once(name: str) -> dict:
        spec = TaskSpec(tracking_tasks.child_run_task, args=(parent, name), env_vars={tracking.TRACKING_ENV: store})
        return submit_tasks([spec])[0]

    results = [once("expert-0"), once("expert-1")]
    while results[-1]["pid"] != results[-2]["pid"] and len(results) < 5:  # Ray may retire an idle worker
        results.append(once(f"expert-{len(results)}"))
    assert results[-1]["pid"] == results[-2]["pid"]  # the same worker process ran the last two tasks
    assert len({r["run_id"] for r in results}) == len(results)
    for result in results:
        assert result["uri"] == store  # the URI came through the runtime environment
        assert result["active_before"] is None and result["active_after"] is None
        run = client.get_run(result["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(result["run_id"], "loss")] == [1, 2]


def test_a_deleted_experiment_or_an_unassembled_run_is_a_clear_error(store, client, parent, tmp_path):
    client.delete_experiment(client.create_experiment("gone", artifact_location=tmp_path.as_uri()))
    with pytest.raises(ValueError, match="experiment 'gone' is deleted"):
        tracking.start_parent(store, "gone", {}, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="assemble the run"):
        tracking.log_ensemble_model(store, parent, str(tmp_path))
