"""Compute islands on Ray: connect, find islands, and run plain Python callables as Ray tasks.

This module, `archipelago.platform.jobs` and `archipelago.platform.data_parallel` (Ray Train) are
the only places in Archipelago that import Ray (its API has changed several times). Everything
else hands plain functions to `submit_tasks`.

An *island* is a group of Ray nodes that carry the label `island=<name>`
(`ray start --labels island=a`). A `TaskSpec` with an island becomes a Ray task with the hard
label selector `{"island": name}` (Ray >= 2.49: `fn.options(label_selector=...)`); a spec without
an island runs wherever Ray has room. `submit_tasks` first checks, for a bounded time, that every
island it needs has an alive node, because Ray would otherwise leave the task pending forever.

Authentication: Archipelago uses Ray token authentication everywhere. Ray enables it by itself for
an embedded local instance (and writes a token to ~/.ray/auth_token), but a driver that joins a
cluster, `ray start`, and the `ray job` CLI only use it when RAY_AUTH_MODE=token is set. So
`use_token_auth()` sets RAY_AUTH_MODE=token in this process's environment when the variable is
unset; `connect` and the job helpers call it, and every process started from here (`ray start`,
job drivers, Ray workers) inherits it. An explicit RAY_AUTH_MODE (for example `disabled`) always
wins. On a cluster: create the token once with `ray get-auth-token --generate`, copy it (or set
RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) to every node and client, and export RAY_AUTH_MODE=token in
the shells that run `ray start` and `ray job submit`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError
from ray.experimental import tqdm_ray

ISLAND_LABEL = "island"
AUTH_MODE_VAR = "RAY_AUTH_MODE"
_REACH_TIMEOUT_S = 5.0  # how long an address may take to accept a connection and answer
# A client's first bytes on an HTTP/2 connection; a gRPC server answers with a SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_SETTINGS = 4  # frame type, the fourth byte of a frame header
_connected_to: str | None = None  # the address `connect` joined ("local" for the embedded Ray)


class MissingIslandError(RuntimeError):
    """No alive node carries the label of an island that work was placed on."""


class TaskFailedError(RuntimeError):
    """A task raised, or its worker died more often than its retries allow."""

    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(f"task {name!r} failed: {type(cause).__name__}: {cause}")
        self.name = name
        self.cause = cause


@dataclass(frozen=True)
class TaskSpec:
    """One plain Python call to run as a Ray task."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""  # shown by Ray and in errors; defaults to the function's name
    island: str | None = None  # None: anywhere Ray has room
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 3  # retries after the worker process or its node dies
    retry_exceptions: bool = False  # also retry when the function itself raises
    env_vars: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", "task"))


def use_token_auth() -> None:
    """Default this process and its children to Ray token authentication (see module doc)."""
    if os.environ.get(AUTH_MODE_VAR) is None:
        os.environ[AUTH_MODE_VAR] = "token"  # for every process started from here
        _refresh_ray_config()


def _refresh_ray_config() -> None:
    """Make this process see RAY_AUTH_MODE changed after `import ray`.

    Ray caches its settings (RayConfig) when it is imported and has no public API to re-read them;
    its own private helper for enabling token auth re-initializes that cache, as this does. It is
    the one private Ray call of the project; if a release drops it, children still inherit the
    variable and only this process keeps its old setting.
    """
    try:
        from ray._raylet import Config
    except ImportError:
        return
    Config.initialize("")


def connect(address: str | None, runtime_env: dict | None = None, *, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address`, or start Ray inside this process when it is None.

    With None, RAY_ADDRESS is joined when set; otherwise (or with "local") Ray starts locally with
    address="local", so a stale cluster address file is never picked up (`num_cpus` applies only
    then). An unreachable address raises ConnectionError within a few seconds. Calling again for
    the same cluster does nothing; asking for another one while connected raises RuntimeError.
    """
    global _connected_to
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target not in ("local", "auto"):
        _check_reachable(target)
    if ray.is_initialized():
        if _connected_to not in (None, target):
            raise RuntimeError(f"already connected to Ray at {_connected_to!r}; cannot join {target!r}")
        return
    use_token_auth()
    # The embedded instance skips the dashboard: faster, and runs sharing a machine don't clash on 8265.
    local = {"num_cpus": num_cpus, "include_dashboard": False} if target == "local" else {}
    ray.init(address=target, runtime_env=runtime_env, **local)
    _connected_to = target


def disconnect() -> None:
    """Leave the cluster; an embedded Ray instance stops."""
    global _connected_to
    ray.shutdown()
    _connected_to = None


def _check_reachable(address: str) -> None:
    """Raise ConnectionError naming `address` unless a gRPC (HTTP/2) server answers there.

    Ray itself would retry an unreachable GCS for minutes. Sending the HTTP/2 client preface and
    reading the server's first frame also catches a port that answers but is not Ray's GCS, such
    as the dashboard's HTTP port (the address for job submission, not for `connect`).
    """
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not of the form host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=_REACH_TIMEOUT_S) as conn:
            if _tls_enabled():  # a TLS server would not answer a plain preface
                return
            conn.sendall(_HTTP2_PREFACE)
            first_frame = conn.recv(9)
    except OSError as err:
        raise ConnectionError(
            f"cannot reach a Ray cluster at {address!r} ({err}); is `ray start --head` running there?"
        ) from err
    if len(first_frame) < 9 or first_frame[3] != _HTTP2_SETTINGS:
        raise ConnectionError(
            f"{address!r} answers but is not a Ray GCS address; pass the head's host:port as "
            "printed by `ray start --head` (6379 by default), not the dashboard's"
        )


def _tls_enabled() -> bool:
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def nodes_by_island() -> dict[str, list[str]]:
    """Map each island label to the ids of its alive nodes (nodes without the label are left out)."""
    if not ray.is_initialized():
        connect(None)
    islands: dict[str, list[str]] = {}
    for node in ray.nodes():
        island = node.get("Labels", {}).get(ISLAND_LABEL)
        if node["Alive"] and island is not None:
            islands.setdefault(island, []).append(node["NodeID"])
    return islands


def require_islands(names: Iterable[str], wait_s: float) -> None:
    """Wait up to `wait_s` seconds for every named island to have an alive node."""
    wanted = set(names)
    deadline = time.monotonic() + wait_s
    while True:
        present = nodes_by_island()
        missing = sorted(wanted - present.keys())
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise MissingIslandError(
                f"no alive node on island(s) {', '.join(map(repr, missing))} after {wait_s:g} s; "
                f"islands present: {', '.join(map(repr, sorted(present))) or 'none'}. Add one with "
                f"`ray start --address <head> --labels {ISLAND_LABEL}={missing[0]}`."
            )
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))


def submit_tasks(specs: Sequence[TaskSpec], island_wait_s: float = 60.0) -> list[Any]:
    """Run every spec as a Ray task and return their results in the order of `specs`.

    The first failure (in completion order) cancels the tasks still running and raises
    TaskFailedError naming the task.
    """
    if not ray.is_initialized():
        connect(None)
    require_islands({spec.island for spec in specs if spec.island is not None}, island_wait_s)
    refs = [_start(spec) for spec in specs]
    names = {ref: spec.name for ref, spec in zip(refs, specs, strict=True)}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except RayError as err:
            for ref in pending:
                ray.cancel(ref)
            raise TaskFailedError(names[done[0]], _cause(err)) from err
    return ray.get(refs)


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


_remote_call = ray.remote(_call)


def _start(spec: TaskSpec) -> ray.ObjectRef:
    """Start one spec as a Ray task."""
    return _remote_call.options(**_task_options(spec)).remote(spec.fn, spec.args, dict(spec.kwargs))


def _task_options(spec: TaskSpec) -> dict[str, Any]:
    """Ray task options for one spec."""
    options: dict[str, Any] = {
        "name": spec.name,
        "num_cpus": spec.num_cpus,
        "num_gpus": spec.num_gpus,
        "max_retries": spec.max_retries,
        "retry_exceptions": spec.retry_exceptions,
    }
    if spec.island is not None:
        options["label_selector"] = {ISLAND_LABEL: spec.island}
    if spec.env_vars:
        options["runtime_env"] = {"env_vars": dict(spec.env_vars)}
    return options


def _cause(err: RayError) -> BaseException:
    """The user's own exception inside a RayTaskError, else the Ray error itself."""
    cause = getattr(err, "cause", None) if isinstance(err, RayTaskError) else None
    return cause if isinstance(cause, BaseException) else err


class RayProgressBar:
    """A training progress bar inside a Ray worker, drawn by the driver as a bar (Ray's tqdm
    integration) instead of as log lines interleaved with every other worker's.

    `ray.experimental.tqdm_ray.tqdm` takes only part of tqdm's interface, so this gives it the part
    that training uses (see `archipelago.experts.training.ProgressBar`): the loss of `set_postfix`
    goes into the description, `initial` into the count.
    """

    def __init__(self, iterable: Iterable[Any], desc: str = "", total: int | None = None, initial: int = 0,
                 disable: bool = False, **_: Any) -> None:
        self._iterable, self._desc = iterable, desc
        self._bar = None if disable else tqdm_ray.tqdm(desc=desc, total=total)
        if self._bar is not None:
            self._bar.update(initial)

    def __iter__(self) -> Iterator[Any]:
        for item in self._iterable:
            yield item
            if self._bar is not None:
                self._bar.update(1)

    def set_postfix(self, **values: Any) -> None:
        if self._bar is not None:
            self._bar.set_description(f"{self._desc} ({', '.join(f'{k}={v}' for k, v in values.items())})")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def current_placement() -> dict[str, Any]:
    """Inside a task: where it runs, as {"node_id", "island", "hostname", "pid"} (no node or island
    when called outside Ray)."""
    context = ray.get_runtime_context() if ray.is_initialized() else None
    return {
        "node_id": context.get_node_id() if context else None,
        "island": context.get_node_labels().get(ISLAND_LABEL) if context else None,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
