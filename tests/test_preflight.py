"""Every bad input of a fit is a clear error before any training starts, with nothing half-written.

Each test calls `runner.fit` (configs built from plain dicts, as a YAML file or the command line
gives them) with training replaced by a guard that fails the test if it is ever reached, then
checks that the error names the bad input and that the run directory was not even created.
"""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from archipelago.platform import runner, tracking
from archipelago.platform.cli import main
from archipelago.platform.config import RunConfig
from archipelago.platform.islands import MissingIslandError
from archipelago.platform.runner import Launch
from archipelago.platform.steps import RunConflict

TINY = {"steps": 4, "batch_size": 8, "warmup_steps": 1, "progress": False}
BASE: dict[str, Any] = {
    "domain": "timeseries",
    "data": "sines:40",
    "experts": 2,
    "domain_config": {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1},
    "expert": TINY,
    "router": TINY,
}
IN_PROCESS = Launch(ray=False, track=False)


@pytest.fixture(autouse=True)
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make reaching the training step a test failure."""

    def guard(*args, **kwargs):
        raise AssertionError("training started although the input was bad")

    monkeypatch.setattr(runner, "train_parts", guard)


def fit(run_dir: Path | str, launch: Launch = IN_PROCESS, **changes: Any) -> None:
    runner.fit(RunConfig(**(BASE | changes)), str(run_dir), launch=launch)


def assert_nothing_written(run_dir: Path) -> None:
    assert not run_dir.exists(), f"{run_dir} was created: {sorted(p.name for p in run_dir.iterdir())}"


def closed_port() -> int:
    """A local port nothing listens on (the probe socket is closed again)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unknown_domain(tmp_path: Path) -> None:
    known = r"\['crystals', 'graphs', 'images', 'timeseries'\]"
    with pytest.raises(ValueError, match=rf"unknown domain 'timeseriez'.*built-in domains: {known}"):
        fit(tmp_path / "run", domain="timeseriez")
    assert_nothing_written(tmp_path / "run")


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"expertz": 3}, "expertz"),
        ({"expert": TINY | {"stepz": 3}}, r"expert\.stepz"),
        ({"partition": {"balancd": False}}, r"partition\.balancd"),
        ({"placement": [{"island": "a", "gpus": 1}, {}]}, r"placement\.0\.gpus"),
    ],
)
def test_unknown_config_key_is_named(tmp_path: Path, changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=rf"{key}\s+Extra inputs are not permitted"):
        fit(tmp_path / "run", **changes)
    assert_nothing_written(tmp_path / "run")


def test_unknown_domain_config_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"(?s)invalid domain_config for domain 'timeseries'.*windw"):
        fit(tmp_path / "run", domain_config=BASE["domain_config"] | {"windw": 8})
    assert_nothing_written(tmp_path / "run")


def test_island_without_a_node(ray_local: None, tmp_path: Path) -> None:
    with pytest.raises(MissingIslandError, match=r"no alive node on island\(s\) 'nowhere' after 1 s"):
        fit(tmp_path / "run", Launch(track=False, island_wait_s=1), placement=[{"island": "nowhere"}, {}])
    assert_nothing_written(tmp_path / "run")


def test_unreachable_ray_address_while_connected_elsewhere(ray_local: None, tmp_path: Path) -> None:
    """The address is checked before `connect` looks at the embedded Ray this session holds, so
    the error names the unreachable address (not "already connected")."""
    address = f"127.0.0.1:{closed_port()}"
    with pytest.raises(ConnectionError, match=rf"cannot reach a Ray cluster at '{address}'"):
        fit(tmp_path / "run", Launch(address=address, track=False))
    assert_nothing_written(tmp_path / "run")


def test_unreachable_tracking_server(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ConnectionError, match=rf"cannot reach the MLflow tracking server at '{uri}'"):
        fit(tmp_path / "run", Launch(ray=False, tracking_uri=uri))
    assert_nothing_written(tmp_path / "run")


class HtmlEverywhere(http.server.BaseHTTPRequestHandler):
    """A web app that is not MLflow: every path answers with the same HTML page (or HTTP `status`)."""

    status = 200

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        body = b"<!doctype html><html><body>" + b"SECRET-PAGE " * 200 + b"</body></html>"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass  # keep the test output clean


class BehindAuthProxy(HtmlEverywhere):
    status = 401


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    """`python -m http.server`: files of a folder, an HTML 404 page for the rest."""

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on a free local port in a thread; yields the server's URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(params=["html page", "plain http.server"])
def not_mlflow(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a live HTTP server that is not an MLflow tracking server."""
    files = tmp_path / "served"
    files.mkdir()
    handler = HtmlEverywhere if request.param == "html page" else functools.partial(QuietFiles, directory=str(files))
    with serve(handler) as url:
        yield url


def test_a_server_that_is_not_mlflow_is_refused_naming_it(not_mlflow: str) -> None:
    refusal = rf"'{not_mlflow}' answered but is not an MLflow tracking server"
    with pytest.raises(ConnectionError, match=refusal) as caught:
        tracking.check_tracking(not_mlflow)
    message = str(caught.value)
    assert "text/html" in message and "SECRET" not in message and "\n" not in message


def test_an_authenticating_proxy_is_accepted() -> None:
    """401/403 means a proxy asks for credentials: MLflow's own auth settings decide later."""
    with serve(BehindAuthProxy) as url:
        tracking.check_tracking(url)


def test_the_command_line_refuses_a_server_that_is_not_mlflow(not_mlflow: str, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    settings = tmp_path / "run.yaml"
    settings.write_text(yaml.safe_dump(BASE | {"run_dir": str(run_dir)}))
    assert main(["fit", str(settings), "--in-process", "--tracking-uri", not_mlflow]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], lines
    assert f"'{not_mlflow}' answered but is not an MLflow tracking server" in lines[0]
    assert_nothing_written(run_dir)


def test_run_directory_without_write_permission() -> None:
    """/proc refuses new files even to root (the tests may run as root, whom chmod does not stop)."""
    run_dir = Path("/proc/archipelago-test/run")
    with pytest.raises(PermissionError, match=r"cannot write to the run directory /proc/archipelago-test/run"):
        fit(run_dir)
    assert not run_dir.parent.exists()


def test_run_directory_holding_a_different_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = {"config": RunConfig(**(BASE | {"experts": 3})).model_dump(mode="json")}
    (run_dir / "run.json").write_text(json.dumps(other))
    with pytest.raises(RunConflict, match=r"already holds a different run \(differs in experts\)"):
        fit(run_dir)
    assert [p.name for p in run_dir.iterdir()] == ["run.json"]
    assert json.loads((run_dir / "run.json").read_text()) == other


def test_run_directory_holding_other_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(RunConflict, match=r"is not empty and holds no run\.json"):
        fit(run_dir)
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]


def test_more_experts_than_windows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"experts=5 is larger than the 4 records of the data"):
        fit(tmp_path / "run", data="sines:4", experts=5)
    assert_nothing_written(tmp_path / "run")
