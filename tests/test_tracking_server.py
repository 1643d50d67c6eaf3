"""A fit tracked on a real `mlflow server` (SQLite backend, artifacts served through the server) on
127.0.0.1: `archipelago fit` in a fresh process trains its experts and router in Ray workers, which
report to the server over HTTP; then the runs, their metrics, the registered model and its
artifacts are read back through MlflowClient and the model samples.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from archipelago.platform.tracking import PARENT_TAG, PROBE_PATH, TRACKING_ENV

ARCHIPELAGO = str(Path(sys.executable).with_name("archipelago"))
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
TINY = {"steps": 6, "batch_size": 16, "warmup_steps": 1, "log_every": 2, "progress": False}
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URI of an `mlflow server` of this test module; stopped by its process group at the end."""
    folder, port = tmp_path_factory.mktemp("mlflow-server"), _free_port()
    command = [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = folder / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, process, log)
        yield uri
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def _wait_healthy(uri: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        # Ready when the REST API answers the probe `check_tracking` makes, not only /health:
        # the store behind the API warms up on its first request, which on a loaded machine can
        # take longer than the probe's timeout.
        with suppress(OSError), urllib.request.urlopen(f"{uri}{PROBE_PATH}", timeout=30) as answer:
            if answer.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {uri} not ready after {START_TIMEOUT_S} s; see {log}")


@pytest.mark.cluster
def test_a_fit_on_ray_workers_is_tracked_on_a_real_server(server: str, tmp_path: Path) -> None:
    settings = tmp_path / "run.yaml"
    settings.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "data": "sines:200", "experts": 2, "expert": TINY, "router": TINY,
        "domain_config": {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1},
    }))
    env = {name: value for name, value in os.environ.items() if name != TRACKING_ENV}
    fit = [ARCHIPELAGO, "fit", str(settings), "--tracking-uri", server, "--register", "sines-on-server",
           "--experiment", "server-test"]
    done = subprocess.run(fit, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (tmp_path / "mlflow.db").exists()  # nothing tracked beside the server

    client = mlflow.MlflowClient(server)
    experiment = client.get_experiment_by_name("server-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if PARENT_TAG not in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {run.info.run_name: run for run in runs if run.data.tags.get(PARENT_TAG) == parents[0].info.run_id}
    assert sorted(children) == ["expert-0", "expert-1", "router"]
    for name, child in children.items():
        assert child.info.status == "FINISHED" and child.data.tags["node"], name  # trained in a Ray worker
        losses = client.get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in losses] == [2, 4, 6] and all(np.isfinite(m.value) for m in losses), name

    version = client.get_model_version("sines-on-server", "1")
    assert version.status == "READY" and version.run_id == parents[0].info.run_id
    mlflow.set_tracking_uri(server)
    try:  # the model's artifacts come through the server's artifact proxy
        model = mlflow.pyfunc.load_model("models:/sines-on-server/1")
    finally:
        mlflow.set_tracking_uri(None)
    samples = model.predict({"n": 4, "strategy": "top1", "steps": 2, "seed": 0})
    assert np.asarray(samples).shape[0] == 4 and np.isfinite(np.asarray(samples)).all()
