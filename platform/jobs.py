"""Ray job submission: run an Archipelago command on a cluster, at most once per config.

A job is a shell command (for example `archipelago train run.yaml`) that Ray runs on the head node
of a cluster with the local working directory uploaded beside it; its address is the dashboard's
HTTP address (`http://<head>:8265`), not the GCS address that `islands.connect` takes.

The submission id is a short hash of the resolved config (`submission_id_for`), so submitting the
same config twice returns the job already on the cluster (pending, running or succeeded) instead of
starting a second copy. A Ray cluster never reuses a submission id, so resubmitting a config whose
job failed or was stopped submits attempt `<id>-2` (then `-3`, ...), which resumes from the run's
checkpoints.

Authentication follows `archipelago.platform.islands`: token mode unless RAY_AUTH_MODE says
otherwise, with the token from ~/.ray/auth_token (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH). The
equivalent CLI is `RAY_AUTH_MODE=token ray job submit --address http://<head>:8265
--submission-id <id> --working-dir . -- <command>`.

`job_for` builds the job of `archipelago submit`: an `archipelago fit` of resolved settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray.job_submission import JobStatus, JobSubmissionClient

from archipelago.platform import tracking
from archipelago.platform.islands import use_token_auth

if TYPE_CHECKING:
    from archipelago.platform.cli_config import Settings

# gitignore-style patterns never uploaded with a working directory: history, run outputs,
# tracking stores, environments, caches, weights and credential files.
DEFAULT_EXCLUDES = (
    ".git",
    "runs/",
    "mlruns/",
    "mlflow.db",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.safetensors",
    "*.ckpt",
    "build/",
    "dist/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".env",
    "*.pem",
)
_POLL_S = 0.5
_LOG_TAIL_CHARS = 4000

logger = logging.getLogger(__name__)


def submission_id_for(config: dict) -> str:
    """A deterministic submission id: a short hash of the config's canonical JSON."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return "archipelago-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Job:
    entrypoint: list[str]
    env_vars: dict[str, str]
    submission_id: str


def job_for(settings: Settings, environ: Mapping[str, str], island: str | None = None,
            experts: Sequence[int] = ()) -> Job:
    """The job that runs `archipelago fit` on the cluster with these settings (with `island`: only
    that island's part, `fit --island`, of the `experts` given or those placed there).

    The settings travel inline as JSON, so nothing is written into the working directory; the
    address is left out (the job joins the cluster it runs on, through the RAY_ADDRESS that Ray
    sets for it) and so is the tracking URI, which travels as MLFLOW_TRACKING_URI in the runtime
    environment with RAY_AUTH_MODE. The submission id hashes the entrypoint and the tracking URI.
    """
    values = {key: value for key, value in settings.as_dict().items() if key not in ("address", "tracking_uri")}
    uri = settings.launch.tracking_uri or environ.get(tracking.TRACKING_ENV)
    env = {"RAY_AUTH_MODE": environ.get("RAY_AUTH_MODE", "token")}
    if settings.launch.track and uri:
        env[tracking.TRACKING_ENV] = tracking.resolve_tracking_uri(uri)
    entrypoint = ["archipelago", "fit", "--config-json", json.dumps(values, sort_keys=True, separators=(",", ":"))]
    if island is not None:
        entrypoint += ["--island", island, *(flag for k in sorted(set(experts)) for flag in ("--expert", str(k)))]
    submission_id = submission_id_for({"entrypoint": entrypoint, "tracking_uri": env.get(tracking.TRACKING_ENV)})
    return Job(entrypoint=entrypoint, env_vars=env, submission_id=submission_id)


def submit_job(
    address: str,
    entrypoint: list[str],
    working_dir: str,
    env_vars: dict[str, str],
    submission_id: str,
    excludes: Sequence[str] = (),
) -> str:
    """Submit `entrypoint` as a Ray job unless a job of `submission_id` is pending, running or
    succeeded there; return the id of that job or of the new one.

    A job of this id that failed or was stopped does not block a resubmission: the new job gets the
    next attempt id (`<id>-2`, `<id>-3`, ...; Ray never reuses an id). `excludes` are gitignore-style
    patterns added to DEFAULT_EXCLUDES.
    """
    client = _client(address)
    attempts = _attempts(client, submission_id)
    if attempts:
        last, status = attempts[-1]
        if status == JobStatus.SUCCEEDED or not status.is_terminal():
            logger.info("job %s is %s on %s; not submitting it again", last, status.value, address)
            return last
        logger.warning("job %s ended %s on %s: submitting the same settings again", last, status.value, address)
        submission_id = f"{submission_id}-{len(attempts) + 1}"
    runtime_env = {
        "working_dir": working_dir,
        "excludes": [*DEFAULT_EXCLUDES, *excludes],
        "env_vars": dict(env_vars),
    }
    try:
        return client.submit_job(
            entrypoint=shlex.join(entrypoint), submission_id=submission_id, runtime_env=runtime_env
        )
    except RuntimeError:
        if any(job.submission_id == submission_id for job in client.list_jobs()):  # another submitter won the race
            return submission_id
        raise


def wait_job(address: str, submission_id: str, timeout_s: float) -> str:
    """Wait for the job to finish and return its final status (SUCCEEDED, FAILED or STOPPED).

    On any status but SUCCEEDED the tail of the job's logs is logged as an error. Raises
    TimeoutError naming the job and its last status after `timeout_s` seconds.
    """
    client = _client(address)
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(submission_id)
    while not status.is_terminal():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {submission_id!r} still {status.value} after {timeout_s:g} s")
        time.sleep(_POLL_S)
        status = client.get_job_status(submission_id)
    if status != JobStatus.SUCCEEDED:
        logs = client.get_job_logs(submission_id)[-_LOG_TAIL_CHARS:]
        logger.error("job %s ended %s; its logs end with:\n%s", submission_id, status.value, logs)
    return status.value


def _client(address: str) -> JobSubmissionClient:
    use_token_auth()
    return JobSubmissionClient(address)


def _attempts(client: JobSubmissionClient, submission_id: str) -> list[tuple[str, JobStatus]]:
    """The jobs of `submission_id` on the cluster, first attempt first: (id, status)."""

    def attempt(job_id: str) -> int | None:
        head, _, n = job_id.rpartition("-")
        return 1 if job_id == submission_id else int(n) if head == submission_id and n.isdigit() else None

    found = sorted((n, job.submission_id, job.status) for job in client.list_jobs()
                   if (n := attempt(job.submission_id or "")) is not None)
    return [(job_id, status) for _, job_id, status in found]
