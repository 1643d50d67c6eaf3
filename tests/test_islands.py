"""Islands on Ray: tasks, placement by island label, bounded failures, retries, job submission.

Local tests share the embedded `ray_local` instance. The two-node cluster (islands "a" and "b") is
started once for the module and reached only from subprocess drivers and over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.job_submission import JobSubmissionClient

from archipelago.platform.islands import (
    MissingIslandError,
    TaskFailedError,
    TaskSpec,
    connect,
    current_placement,
    submit_tasks,
)
from archipelago.platform.jobs import submission_id_for, submit_job, wait_job
from tests.cluster import LocalCluster

# Plain functions that know nothing of Ray (workers import this module through PYTHONPATH).


def square_after(x: int, delay_s: float) -> int:
    time.sleep(delay_s)
    return x * x


def env_var(name: str) -> str | None:
    return os.environ.get(name)


def count_attempt_then_fail(attempts_file: str) -> None:
    with open(attempts_file, "a") as attempts:
        attempts.write("attempt\n")
    raise ValueError("bad partition")


def fail_first_attempt(marker: str, how: str) -> str:
    """Fail while `marker` does not exist yet, by SIGKILL of the own process or by raising."""
    if not os.path.exists(marker):
        Path(marker).touch()
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("transient failure")
    return "second attempt"


# --- the embedded local Ray ---------------------------------------------------------------------


def test_results_come_back_in_submission_order(ray_local: None) -> None:
    delays = [0.6, 0.0, 0.3]  # the first task finishes last
    specs = [TaskSpec(square_after, (x, delay)) for x, delay in enumerate(delays)]
    assert submit_tasks(specs) == [0, 1, 4]


def test_task_without_island_runs_anywhere_with_its_env_vars(ray_local: None) -> None:
    [value] = submit_tasks([TaskSpec(env_var, ("ARCHIPELAGO_PROBE",), env_vars={"ARCHIPELAGO_PROBE": "42"})])
    [placement] = submit_tasks([TaskSpec(current_placement)])
    assert value == "42"
    assert placement["island"] is None and placement["pid"] != os.getpid() and placement["node_id"]


def test_connect_again_is_a_no_op(ray_local: None) -> None:
    connect("local")
    assert submit_tasks([TaskSpec(square_after, (3, 0.0))]) == [9]


def test_missing_island_fails_after_the_bounded_wait_naming_it(ray_local: None) -> None:
    with pytest.raises(MissingIslandError, match="'atlantis'"):
        submit_tasks([TaskSpec(square_after, (2, 0.0), island="atlantis")], island_wait_s=0.5)


def test_unreachable_address_fails_fast_naming_it() -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(ConnectionError, match=re.escape(address)):
        connect(address)


def test_application_error_names_the_task_and_is_not_retried(ray_local: None, tmp_path: Path) -> None:
    attempts = tmp_path / "attempts"
    spec = TaskSpec(count_attempt_then_fail, (str(attempts),), name="expert-3", max_retries=3)
    with pytest.raises(TaskFailedError, match="expert-3.*bad partition") as failure:
        submit_tasks([spec])
    assert isinstance(failure.value.cause, ValueError)
    assert attempts.read_text().count("attempt") == 1


@pytest.mark.parametrize("how", ["sigkill", "raise"])
def test_failed_first_attempt_is_retried(ray_local: None, tmp_path: Path, how: str) -> None:
    """A killed worker is a system failure (max_retries); a raise is retried only on request."""
    marker = tmp_path / "first-attempt-done"
    spec = TaskSpec(fail_first_attempt, (str(marker), how), max_retries=1, retry_exceptions=how == "raise")
    assert submit_tasks([spec]) == ["second attempt"]
    assert marker.exists()


# --- a real two-node cluster: island "a" (head) and island "b" ------------------------------------


PLACEMENT_DRIVER = """
import json, sys
from archipelago.platform.islands import TaskSpec, connect, current_placement, nodes_by_island, submit_tasks
connect(sys.argv[1])
specs = [TaskSpec(current_placement, name=f"on-{island}", island=island) for island in ("a", "b")]
print(json.dumps({"placements": submit_tasks(specs, island_wait_s=30), "islands": nodes_by_island()}))
"""


def test_tasks_run_on_the_node_of_their_island(two_nodes: LocalCluster) -> None:
    """The driver starts without RAY_AUTH_MODE: `connect` must turn token authentication on."""
    driver = [sys.executable, "-c", PLACEMENT_DRIVER, two_nodes.address]
    env = {name: value for name, value in os.environ.items() if name != "RAY_AUTH_MODE"}
    done = subprocess.run(driver, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    on_a, on_b = report["placements"]
    assert (on_a["island"], on_b["island"]) == ("a", "b")
    assert report["islands"] == {"a": [on_a["node_id"]], "b": [on_b["node_id"]]}


def test_connect_rejects_the_dashboard_address(two_nodes: LocalCluster) -> None:
    dashboard = two_nodes.dashboard_url.removeprefix("http://")
    with pytest.raises(ConnectionError, match="not a Ray GCS address"):
        connect(dashboard)


def test_job_submission_is_idempotent(two_nodes: LocalCluster, tmp_path: Path) -> None:
    entrypoint = [sys.executable, "-c", "print('hi')"]
    submission_id = submission_id_for({"entrypoint": entrypoint})
    (tmp_path / "note.txt").write_text("a small working dir\n")
    submit = dict(working_dir=str(tmp_path), env_vars={}, submission_id=submission_id, excludes=[])
    assert submit_job(two_nodes.dashboard_url, entrypoint, **submit) == submission_id
    assert wait_job(two_nodes.dashboard_url, submission_id, timeout_s=60) == "SUCCEEDED"
    assert submit_job(two_nodes.dashboard_url, entrypoint, **submit) == submission_id
    client = JobSubmissionClient(two_nodes.dashboard_url)
    # The cluster is shared with other tests' jobs; drivers connecting directly are listed without an id.
    assert [job.submission_id for job in client.list_jobs()].count(submission_id) == 1
    assert "hi" in client.get_job_logs(submission_id)


def test_a_failed_job_is_submitted_again_as_its_next_attempt(two_nodes: LocalCluster, tmp_path: Path) -> None:
    flag = tmp_path / "second-time"  # the entrypoint fails once, then succeeds
    entrypoint = [sys.executable, "-c", f"import os, sys; p = {str(flag)!r}; ok = os.path.exists(p); "
                  "open(p, 'w').close(); sys.exit(0 if ok else 3)"]
    submission_id = submission_id_for({"entrypoint": entrypoint})
    submit = dict(working_dir=str(tmp_path), env_vars={}, submission_id=submission_id, excludes=[])
    assert submit_job(two_nodes.dashboard_url, entrypoint, **submit) == submission_id
    assert wait_job(two_nodes.dashboard_url, submission_id, timeout_s=60) == "FAILED"
    again = submit_job(two_nodes.dashboard_url, entrypoint, **submit)
    assert again == f"{submission_id}-2"
    assert wait_job(two_nodes.dashboard_url, again, timeout_s=60) == "SUCCEEDED"
    assert submit_job(two_nodes.dashboard_url, entrypoint, **submit) == again  # succeeded: not run a third time
