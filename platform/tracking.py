"""MLflow tracking of a run: one parent run per fit, one child run per expert and one for the router.

    uri = resolve_tracking_uri(None)                 # MLflow's default store, made absolute
    check_tracking(uri)                              # fails fast, before any training
    parent = start_parent(uri, "stocks", config.model_dump(mode="json"), run_dir)
    with ChildRun(uri, parent, "expert-0", {"expert": 0, "island": "a"}) as child:   # inside a Ray task
        train_expert_step(run_dir, 0, on_log=child.log)
    model_uri = log_ensemble_model(uri, parent, run_dir, registered_name="stocks")
    finish_run(uri, parent)                          # or: with finishing(uri, parent): ... (FAILED if it raises)

Every call goes through an explicit `mlflow.MlflowClient(uri)` and never through the fluent API
(`mlflow.start_run` keeps the active run in module state, so a Ray worker reused for a second task
would inherit the first task's open run). Child runs are created inside the Ray tasks with the
parent's id (tag `mlflow.parentRunId`); the runner passes the URI to the workers as the environment
variable `TRACKING_ENV` of the Ray runtime environment.

With no tracking URI, MLflow's own default is used (a SQLite file `mlflow.db` in the working
directory), made absolute so that Ray workers and job drivers, which run in other working
directories, write to the same store. Experiments created here in a SQLite store keep their
artifacts beside the database (`<db folder>/mlruns/<experiment>`), not in the creating process's
working directory. An http(s) tracking server works the same way.

The ensemble is logged as a pyfunc model in the models-from-code form
(`archipelago/platform/mlflow_model.py`) with a copy of just the files that sampling reads.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import mlflow
from mlflow.entities import LoggedModelStatus, Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from archipelago.experts import storage
from archipelago.platform import credentials, distill, steps

TRACKING_ENV = "MLFLOW_TRACKING_URI"  # the variable the runner passes to Ray workers
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for nesting runs in its UI
MODEL_FILE = Path(__file__).with_name("mlflow_model.py")  # the models-from-code file
MODEL_NAME = "ensemble"  # the name of the logged model under the parent run
MODEL_ARTIFACT = "run"  # the key of the run-directory copy in the model's artifacts

# MLflow's limits (mlflow.utils.validation): longer values are refused.
MAX_PARAM_VALUE, MAX_TAG_VALUE, MAX_KEY = 6000, 8000, 250
CHECK_TIMEOUT_S = 5.0  # how long a tracking server may take to answer `check_tracking`
# A cheap read that every MLflow tracking server answers with JSON (the Default experiment always exists).
PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"
AUTH_STATUSES = (401, 403)  # an authenticating proxy in front of MLflow: MLflow's own auth settings decide


# --- the tracking URI ----------------------------------------------------------------------------


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI to use, explicit and absolute.

    None: `mlflow.get_tracking_uri()`, which honours `mlflow.set_tracking_uri`, then the variable
    MLFLOW_TRACKING_URI, then MLflow's default `sqlite:///<abs cwd>/mlflow.db`. A SQLite URI with
    a relative path is made absolute against this process's working directory. A URI that carries a
    credential (`http://user:password@host`) raises `credentials.SecretInConfig`: it would travel to
    Ray workers and jobs in plain sight; MLflow reads MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN.
    """
    key = "tracking_uri" if uri else TRACKING_ENV  # where the URI came from, for the error
    uri = uri or mlflow.get_tracking_uri()
    credentials.check_uri(uri, key)
    path = _sqlite_path(uri)
    if path is not None and path != ":memory:" and not os.path.isabs(path):
        return f"sqlite:///{os.path.abspath(path)}"
    return uri


def check_tracking(uri: str) -> None:
    """Fail fast, before any training: an unreachable server or an unwritable SQLite folder.

    http(s): one call of MLflow's REST API (`PROBE_PATH`) must answer within CHECK_TIMEOUT_S, with
    JSON or with 401/403 (an authenticating proxy); ConnectionError names the URI when nothing
    answers, or when what answers is not MLflow (an HTML page, a 404). SQLite: the database's
    folder is created when missing, and PermissionError names it when it cannot be written.
    """
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
        return
    path = _sqlite_path(uri)
    if path is not None and path != ":memory:":
        _check_sqlite_folder(uri, Path(path).parent)


def _sqlite_path(uri: str) -> str | None:
    """The database path of a `sqlite:///<path>` URI (None for any other URI)."""
    return unquote(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def _check_server(uri: str) -> None:
    url = uri.rstrip("/") + PROBE_PATH
    try:
        with urllib.request.urlopen(url, timeout=CHECK_TIMEOUT_S) as answer:
            status, content_type = answer.status, answer.headers.get_content_type()
    except urllib.error.HTTPError as error:  # an error status: a server is there, but which one?
        status, content_type = error.code, error.headers.get_content_type()
        error.close()
    except OSError as error:  # URLError, refused connections and timeouts
        reason = getattr(error, "reason", error)
        if isinstance(reason, ssl.SSLError):
            return  # a TLS server answered; MLflow's own TLS settings decide whether it is trusted
        raise ConnectionError(
            f"cannot reach the MLflow tracking server at {uri!r} ({reason}); start it with "
            f"`mlflow server --host <host> --port <port>` or pass another tracking URI"
        ) from error
    # MLflow answers its API with JSON, errors included; the body is never shown (it may be a page).
    if status not in AUTH_STATUSES and content_type != "application/json":
        raise ConnectionError(
            f"{uri!r} answered but is not an MLflow tracking server (GET {PROBE_PATH.split('?')[0]}: HTTP "
            f"{status}, {content_type}); pass the URI of an `mlflow server`"
        )


def _check_sqlite_folder(uri: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(f"cannot create the folder {str(folder)!r} of tracking URI {uri!r}: {error}") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"the folder {str(folder)!r} of tracking URI {uri!r} is not writable")


# --- the parent run ------------------------------------------------------------------------------


def start_parent(
    uri: str, experiment: str, config: Mapping[str, Any], run_dir: str, run_name: str | None = None
) -> str:
    """Create the parent run of one fit (and its experiment if needed); returns its run id.

    The config is logged whole as `config.json` and flattened to dotted params (values longer than
    MLflow's limit are cut; the artifact keeps them whole). Tags: run_dir, domain, experts.
    """
    client = mlflow.MlflowClient(uri)
    tags = {"run_dir": str(run_dir), "domain": config.get("domain"), "experts": config.get("experts")}
    run = client.create_run(_experiment_id(client, uri, experiment), run_name=run_name, tags=_tag_values(tags))
    run_id = run.info.run_id
    # MlflowClient.log_batch splits into batches within the server's limits itself.
    client.log_batch(run_id, params=[Param(key, value) for key, value in flatten_params(config).items()])
    client.log_dict(run_id, dict(config), "config.json")
    return run_id


def finish_run(uri: str, run_id: str, failed: bool = False) -> None:
    """Mark a run FINISHED, or FAILED."""
    status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
    mlflow.MlflowClient(uri).set_terminated(run_id, status)


@contextmanager
def finishing(uri: str, run_id: str) -> Iterator[None]:
    """Mark the run FINISHED when the block ends, or FAILED when it raises (then re-raise)."""
    try:
        yield
    except BaseException:
        finish_run(uri, run_id, failed=True)
        raise
    finish_run(uri, run_id)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists as dotted keys (`expert.lr`, `placement.0.island`), values as text.

    Strings stay as they are, everything else is JSON (`null`, `true`, `0.001`); an empty dict or
    list stays one param (`{}`, `[]`) so that every config key shows up.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else None
        if items is not None and len(value) > 0:
            flat.update(flatten_params({str(k): v for k, v in items}, f"{name}."))
        else:
            flat[name[:MAX_KEY]] = (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_VALUE]
    return flat


def _tag_values(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags as MLflow stores them: text within its length limit (None values left out), any credential
    masked (a step run on `--run-dir s3://KEY:SECRET@bucket/...` would tag its checkpoint's path)."""
    return {str(k)[:MAX_KEY]: credentials.redact(str(v))[:MAX_TAG_VALUE] for k, v in tags.items() if v is not None}


def _experiment_id(client: mlflow.MlflowClient, uri: str, name: str) -> str:
    """The id of the named experiment, created when missing (a concurrent creation is fine)."""
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted: restore it (`mlflow experiments restore "
            f"--experiment-id {found.experiment_id}`) or choose another experiment name"
        )
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Beside the database for a SQLite store; the server's choice otherwise.

    MLflow's own choice for a SQLite store is `./mlruns` of the process that creates the
    experiment, which for a Ray job driver is a temporary working directory.
    """
    path = _sqlite_path(uri)
    if path is None or path == ":memory:":
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("_") or "experiment"
    return (Path(path).parent / "mlruns" / slug).as_uri()


# --- child runs ----------------------------------------------------------------------------------


class ChildRun:
    """A run nested under the parent, for one expert or the router; use it as a context manager.

    `log(step, metrics)` is the training's `on_log` callback: metrics are buffered and sent with
    `log_batch` every `flush_every` calls, after `flush_s` seconds, and on exit. Leaving the `with`
    block through an exception flushes and marks the run FAILED; otherwise it is FINISHED.
    """

    def __init__(
        self,
        uri: str,
        parent_id: str,
        name: str,
        tags: Mapping[str, Any] | None = None,
        flush_every: int = 10,
        flush_s: float = 30.0,
    ) -> None:
        self._client = mlflow.MlflowClient(uri)
        experiment = self._client.get_run(parent_id).info.experiment_id
        all_tags = _tag_values({**(tags or {}), PARENT_TAG: parent_id})
        self.run_id: str = self._earlier_attempt(experiment, parent_id, name) or self._client.create_run(
            experiment, run_name=name, tags=all_tags
        ).info.run_id
        self.set_tags(all_tags)
        self._flush_every, self._flush_s = flush_every, flush_s
        self._pending: list[Metric] = []
        self._calls, self._last_flush = 0, time.monotonic()

    def _earlier_attempt(self, experiment: str, parent_id: str, name: str) -> str | None:
        """The child run an earlier attempt of this task left behind (its worker died), reopened."""
        found = self._client.search_runs(
            [experiment], f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.run_name = '{name}'", max_results=1
        )
        if not found:
            return None
        self._client.update_run(found[0].info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return found[0].info.run_id

    def __enter__(self) -> ChildRun:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            self.flush()
        finally:
            status = RunStatus.FAILED if kind is not None else RunStatus.FINISHED
            self._client.set_terminated(self.run_id, RunStatus.to_string(status))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Buffer one step's metrics (the `on_log(step, metrics)` callback of training)."""
        timestamp = int(time.time() * 1000)
        self._pending += [Metric(key, float(value), timestamp, int(step)) for key, value in metrics.items()]
        self._calls += 1
        if self._calls >= self._flush_every or time.monotonic() - self._last_flush >= self._flush_s:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics now."""
        pending, self._pending = self._pending, []
        self._client.log_batch(self.run_id, metrics=pending)
        self._calls, self._last_flush = 0, time.monotonic()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as text), e.g. the node and partition size once they are known."""
        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in _tag_values(tags).items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a local file or folder (a sample plot, a checkpoint's meta.json, ...)."""
        self._client.log_artifact(self.run_id, os.fspath(path), artifact_path)

    def log_router_calibration(self, rows: list[dict[str, float]]) -> None:
        """The router's accuracy and calibration along t (`router.diagnostics.router_calibration`):
        a table (router_calibration.json), a plot (router_calibration.png), and the accuracy and ECE
        as metric series over step = 100 t."""
        import matplotlib

        matplotlib.use("Agg")  # no display on a worker
        from matplotlib import pyplot

        self._client.log_table(self.run_id, {key: [row[key] for row in rows] for key in rows[0]},
                               "router_calibration.json")
        figure, axis = pyplot.subplots(figsize=(5, 3.2))
        times = [row["t"] for row in rows]
        for key in ("accuracy", "ece", "confidence"):
            axis.plot(times, [row[key] for row in rows], marker="o", label=key)
        axis.set(xlabel="t (1 = noise)", ylim=(0, 1), title="router p(k | x_t, t) on the run's records")
        axis.legend()
        self._client.log_figure(self.run_id, figure, "router_calibration.png")
        pyplot.close(figure)
        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[
            Metric(f"router_{key}_by_t", row[key], now, round(100 * row["t"]))
            for row in rows for key in ("accuracy", "ece")])

    def log_dict(self, value: Mapping[str, Any], name: str) -> None:
        """Write a dict as a JSON (or YAML, by the name's suffix) artifact."""
        self._client.log_dict(self.run_id, dict(value), name)


# --- the ensemble as an MLflow model -------------------------------------------------------------


def log_ensemble_model(uri: str, parent_id: str, run_dir: str, registered_name: str | None = None) -> str:
    """Log the assembled ensemble of `run_dir` as a pyfunc model under the parent run.

    The model's artifacts are a copy of just what sampling reads (see `copy_for_sampling`); with
    `registered_name` it is also registered. Returns `models:/<name>/<version>` when registered,
    else the logged model's URI (`models:/<model id>`). Load it with `mlflow.pyfunc.load_model`
    and call `predict({"n": 16, "strategy": "sample"})`.
    """
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_id)
    with tempfile.TemporaryDirectory(prefix="archipelago-model-") as tmp:
        copy = copy_for_sampling(run_dir, os.path.join(tmp, MODEL_ARTIFACT))
        # Created here, in the parent's experiment: left to `Model.log`, the model would land in the
        # default experiment, because it looks for the experiment of the *active* (fluent) run.
        logged = client.create_logged_model(
            parent.info.experiment_id,
            name=MODEL_NAME,
            source_run_id=parent_id,
            tags=_tag_values({"run_dir": run_dir, **_model_tags(parent)}),
        )
        try:
            with _tracking_uri(uri):
                # `mlflow.pyfunc.log_model` is `Model.log(flavor=mlflow.pyfunc)` without a run_id
                # argument (it reads the fluent active run); Model.log links the model to the parent.
                info = Model.log(
                    artifact_path=None,  # deprecated in favour of name, but still a required argument
                    name=MODEL_NAME,
                    flavor=mlflow.pyfunc,
                    run_id=parent_id,
                    model_id=logged.model_id,
                    python_model=str(MODEL_FILE),
                    artifacts={MODEL_ARTIFACT: copy},
                    pip_requirements=_requirements(),
                    registered_model_name=registered_name,
                )
        except BaseException:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
    if registered_name is not None:
        return f"models:/{registered_name}/{info.registered_model_version}"
    return info.model_uri


def log_sample_grid(uri: str, parent_id: str, run_dir: str, n: int = 64) -> bool:
    """Domains that draw a sample grid (images): n samples of the assembled ensemble with the default
    request, logged under the parent run as samples.png. False where the domain draws none."""
    from archipelago.platform import sdk

    run = sdk.load(run_dir)
    grid = getattr(run.domain, "grid", None)
    if grid is None:
        return False
    mlflow.MlflowClient(uri).log_image(parent_id, grid(run.sample(n, seed=0).batch), "samples.png")
    return True


def _requirements() -> list[str]:
    """Pinned: a bare "archipelago" on PyPI is an unrelated package (install ours from a wheel/index)."""
    return [f"archipelago=={metadata.version('archipelago')}", f"mlflow=={mlflow.__version__}"]


def _model_tags(parent: Run) -> dict[str, Any]:
    return {key: parent.data.tags.get(key) for key in ("domain", "experts")}


def copy_for_sampling(run_dir: str, dest: str) -> str:
    """Copy into local `dest` only the files that `steps.load_ensemble` reads, at the same paths.

    That is run.json, domain.json, partition.json, ensemble.json, and model.safetensors + meta.json
    of each checkpoint ensemble.json names (and students.json with its students' checkpoints, once
    distilled): no records, optimizer state or older checkpoints.
    """
    names = [steps.RUN_FILE, steps.DOMAIN_FILE, steps.PARTITION_FILE, steps.ENSEMBLE_FILE]
    ensemble_uri = storage.join(run_dir, steps.ENSEMBLE_FILE)
    if not storage.exists(ensemble_uri):
        raise FileNotFoundError(f"{run_dir} has no {steps.ENSEMBLE_FILE}: assemble the run before logging its model")
    ensemble = storage.read_json(ensemble_uri)
    checkpoints = ensemble["experts"] + [ensemble[part] for part in ("router", "codec") if ensemble.get(part)]
    students = storage.join(run_dir, distill.STUDENTS, distill.STUDENTS_FILE)
    if storage.exists(students):  # the distilled students sample from the same model (`model=student`)
        names.append(f"{distill.STUDENTS}/{distill.STUDENTS_FILE}")
        saved = storage.read_json(students)
        checkpoints += [saved[key] for key in distill.MODELS.values()]
    names += ["/".join([*parts, file]) for parts in checkpoints for file in ("model.safetensors", "meta.json")]
    for name in names:
        target = Path(dest, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(storage.join(run_dir, *name.split("/"))))
    return dest


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri` for the duration (model logging and
    registration read only that), then restore both it and the MLFLOW_TRACKING_URI variable."""
    saved = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None  # None: unset again
    saved_env = os.environ.get(TRACKING_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop(TRACKING_ENV, None)
        else:
            os.environ[TRACKING_ENV] = saved_env
