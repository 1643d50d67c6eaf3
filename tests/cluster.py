"""A real two-node Ray cluster on this machine for tests: island "a" (head) and island "b".

Each node is one `ray start --block` process started in its own session, with its own short
--temp-dir (Unix socket paths must stay under ~107 characters) and its own free ports, so the
cluster neither touches nor is touched by the embedded Ray of the `ray_local` fixture or by other
Ray instances on the machine. A pytest process can be connected to only one Ray cluster, so tests
talk to this one from subprocess drivers (`python -c ...` calling `islands.connect(address)`) and
through job submission over HTTP, while their own process stays on `ray_local`.

Authentication follows `archipelago.platform.islands.use_token_auth`: the nodes inherit
RAY_AUTH_MODE=token (unless it is set otherwise) and share the token in ~/.ray/auth_token.
Stopping signals each `ray start --block` process, which shuts its node down, then kills whatever
is left of the process groups it started; nothing else is touched (never `ray stop`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
from ray.util.state import list_nodes

from archipelago.platform.islands import use_token_auth

RAY_CLI = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class LocalCluster:
    """A Ray cluster started by these helpers."""

    address: str  # GCS host:port, for islands.connect
    dashboard_url: str  # http://host:port, for job submission
    logs: tuple[Path, ...]  # the output of each node's `ray start`, the head's first
    processes: tuple[subprocess.Popen, ...] = ()  # each node's `ray start --block`, the head's first

    def kill(self) -> None:
        """Kill every node at once, as a lost machine would: SIGKILL to each node's processes and all
        their descendants (Ray workers run in process groups of their own)."""
        doomed = [psutil.Process(process.pid) for process in self.processes if process.poll() is None]
        doomed += [child for parent in list(doomed) for child in parent.children(recursive=True)]
        for process in doomed:
            with suppress(psutil.NoSuchProcess):
                process.kill()


@contextmanager
def two_node_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Start a head on island "a" and a worker on island "b"; stop exactly those at exit."""
    env = _auth_env()
    logs = (tmp_path / "head.log", tmp_path / "worker.log")
    tmp_path.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        head, (address, dashboard_url), worker_ports = _start_head(stack, "a", logs[0], env, extra_ports=2)
        worker_args = ["--address", address, *_agent_ports(*worker_ports)]
        worker = stack.enter_context(_node("b", worker_args, logs[1], env))
        _wait_for_islands(dashboard_url, {"a", "b"}, [(head, logs[0]), (worker, logs[1])])
        yield LocalCluster(address, dashboard_url, logs, (head, worker))


@contextmanager
def one_node_cluster(tmp_path: Path, island: str) -> Iterator[LocalCluster]:
    """A Ray cluster of its own (its own head, GCS and dashboard) whose one node is island `island`."""
    env = _auth_env()
    log = tmp_path / f"island-{island}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        head, (address, dashboard_url), _ = _start_head(stack, island, log, env)
        _wait_for_islands(dashboard_url, {island}, [(head, log)])
        yield LocalCluster(address, dashboard_url, (log,), (head,))


def _auth_env() -> dict[str, str]:
    use_token_auth()
    env = dict(os.environ)
    if env.get("RAY_AUTH_MODE") == "token":  # `ray start --head` never creates a token itself
        subprocess.run([RAY_CLI, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    return env


def _start_head(stack: ExitStack, island: str, log: Path, env: dict[str, str], extra_ports: int = 0
                ) -> tuple[subprocess.Popen, tuple[str, str], list[int]]:
    """A head node on `island`, once its GCS port is open: its process, (GCS address, dashboard
    URL), and `extra_ports` more free ports distinct from its own (for a worker)."""
    gcs_port, dashboard_port, client_port, agent_port, metrics_port, *extra = _free_ports(5 + extra_ports)
    args = ["--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1"]
    args += ["--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port)]
    args += _agent_ports(agent_port, metrics_port)
    head = stack.enter_context(_node(island, args, log, env))
    _wait_for_port(gcs_port, head, log)
    return head, (f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"), extra


@contextmanager
def _node(island: str, args: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """One `ray start --block` node with its own temp dir, ports and island label."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    command = [RAY_CLI, "start", "--block", *args, "--node-ip-address", "127.0.0.1"]
    command += ["--temp-dir", temp_dir, "--num-cpus", "1", "--labels", f"island={island}"]
    command += ["--disable-usage-stats"]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(process: subprocess.Popen) -> None:
    """Ask `ray start --block` to shut its node down, then kill what is left of its group."""
    process.terminate()
    with suppress(subprocess.TimeoutExpired):
        process.wait(STOP_TIMEOUT_S)
    with suppress(ProcessLookupError):  # start_new_session: the group id is the leader's pid
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _agent_ports(agent_port: int, metrics_port: int) -> list[str]:
    return ["--dashboard-agent-listen-port", str(agent_port), "--metrics-export-port", str(metrics_port)]


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every probe stays bound until all are chosen, so the OS cannot
    hand the same port out twice (one port given to two Ray components fails `ray start`)."""
    with ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        _check_running(process, log)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the head's GCS port {port} did not open in {START_TIMEOUT_S:g} s; see {log}")


def _wait_for_islands(dashboard_url: str, islands: set[str], nodes: list[tuple[subprocess.Popen, Path]]) -> None:
    """Poll the state API until every island has an alive node."""
    deadline = time.monotonic() + START_TIMEOUT_S
    seen: object = "nothing yet"
    while time.monotonic() < deadline:
        for process, log in nodes:
            _check_running(process, log)
        try:
            alive = list_nodes(address=dashboard_url, filters=[("state", "=", "ALIVE")], timeout=5)
            seen = {node.labels.get("island") for node in alive}
            if islands <= seen:
                return
        except Exception as err:  # the dashboard answers only once it is up
            seen = err
        time.sleep(0.5)
    raise TimeoutError(f"islands {sorted(islands)} not all alive after {START_TIMEOUT_S:g} s; last saw {seen}")


def _check_running(process: subprocess.Popen, log: Path) -> None:
    if process.poll() is not None:
        raise RuntimeError(f"`ray start` exited with {process.returncode}:\n{log.read_text()[-3000:]}")
