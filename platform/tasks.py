"""The units of work of a run: plain functions of the run directory, run in process or as Ray tasks.

Each training task opens its own MLflow child run under the fit's parent run (through the
tracking URI it is given, never through inherited global state), tags it with where it runs,
streams the training metrics into it, and leaves a log line saying whether it resumed from a
checkpoint. A retried task (after its worker died) reopens the child run of its earlier attempt.

The runner passes `in_ray_worker=True` when it runs a task on Ray: only then are Ray (for the
node, the island and progress bars that the driver draws) and, with a tracking target, MLflow
imported, so that an in-process untracked fit imports neither.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from archipelago.experts.lease import default_ttl_s
from archipelago.experts.training import ProgressBar, TrainResult
from archipelago.platform import steps

logger = logging.getLogger("archipelago.tasks")


@dataclass(frozen=True)
class TrackingTarget:
    """Where a task reports: the tracking URI and the parent run of the fit."""

    uri: str
    parent_id: str


def _report(name: str, result: TrainResult, placement: dict[str, Any]) -> dict[str, Any]:
    if result.resumed_from:
        logger.warning("%s resumed from checkpoint step %d", name, result.resumed_from)
    return {"name": name, "checkpoint": result.checkpoint, "steps": result.steps,
            "resumed_from": result.resumed_from, "final_loss": result.final_loss, **placement}


def _worker(in_ray_worker: bool) -> tuple[dict[str, Any], ProgressBar | None]:
    """Where a task runs ({"node_id", "island", "hostname", "pid"}) and the progress bar it draws."""
    if not in_ray_worker:
        return {"node_id": None, "island": None, "hostname": socket.gethostname(), "pid": os.getpid()}, None
    from archipelago.platform import islands

    return islands.current_placement(), islands.RayProgressBar


def _tracked(name: str, target: TrackingTarget | None, tags: dict[str, Any], train, in_ray_worker: bool,
             report: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run `train(on_log, progress_bar, island)` in a child run; `report(child)` then logs more to it."""
    placement, progress_bar = _worker(in_ray_worker)
    logger.warning("%s starting on node %s (island %s, pid %s)", name, placement["node_id"], placement["island"],
                   placement["pid"])
    if target is None:
        return _report(name, train(None, progress_bar, placement["island"]), placement)
    from archipelago.platform import tracking

    all_tags = {**tags, "node": placement["node_id"], "island": placement["island"], "hostname": placement["hostname"]}
    with tracking.ChildRun(target.uri, target.parent_id, name, all_tags) as child:
        result = train(child.log, progress_bar, placement["island"])
        child.set_tags({"resumed_from": result.resumed_from, "checkpoint": result.checkpoint})
        if report is not None:
            report(child)
        return _report(name, result, placement)


def train_expert_task(run_dir: str, k: int, target: TrackingTarget | None = None, *,
                      in_ray_worker: bool = False, wait: bool | float | None = None) -> dict[str, Any]:
    """Train (or resume) expert k, tracked as a child run; `wait` for its folder's lease as in `Lease`
    (default: on Ray, long enough for a retried task to take over its dead first attempt's lease)."""
    steps.check_expert(run_dir, k)
    summary = steps.partition(run_dir)
    tags = {"expert": k, "partition_size": summary["sizes"][k], "data_fingerprint": summary["data_fingerprint"]}
    wait = _retry_wait(in_ray_worker) if wait is None else wait
    return _tracked(f"expert-{k}", target, tags,
                    lambda on_log, bar, island: steps.train_expert_step(run_dir, k, on_log, bar, wait, island),
                    in_ray_worker)


def train_expert_data_parallel_task(run_dir: str, k: int, target: TrackingTarget | None = None,
                                    island: str | None = None, *, wait: bool | float | None = None,
                                    max_retries: int = 3) -> dict[str, Any]:
    """Train (or resume) expert k data-parallel on its placement's workers on `island`, with Ray Train
    (`archipelago.platform.data_parallel`; runs only on Ray). Rank 0 trains it as `train_expert_task`
    does, tracked in the one child run `expert-<k>` with rank 0's metrics; `max_retries`: restarts
    of the workers after one of them died."""
    from archipelago.platform import data_parallel

    steps.check_expert(run_dir, k)
    lead = functools.partial(train_expert_task, run_dir, k, target, in_ray_worker=True, wait=wait)
    return data_parallel.train_expert(run_dir, k, island, lead, max_retries)


def train_router_task(run_dir: str, target: TrackingTarget | None = None, *,
                      in_ray_worker: bool = False, wait: bool | float | None = None) -> dict[str, Any]:
    """Train (or resume) the router, tracked as a child run."""
    summary = steps.partition(run_dir)
    tags = {"router": True, "partition_sizes": summary["sizes"], "data_fingerprint": summary["data_fingerprint"]}
    wait = _retry_wait(in_ray_worker) if wait is None else wait
    return _tracked("router", target, tags, lambda on_log, bar, _: steps.train_router_step(run_dir, on_log, bar, wait),
                    in_ray_worker, report=lambda child: child.log_router_calibration(steps.router_diagnostics(run_dir)))


def _retry_wait(in_ray_worker: bool) -> float | bool:
    """How long a task waits for its folder's lease. On Ray a retried task may find the lease of
    its first attempt, whose worker died on another node: it waits until that lease expires."""
    return 2 * default_ttl_s() + 5 if in_ray_worker else False
