"""The units of work of a run: plain functions of the run directory, run in process or as Ray tasks.

Each training task opens its own MLflow child run under the fit's parent run (through the
tracking URI it is given, never through inherited global state), tags it with where it runs,
streams the training metrics into it, and leaves a log line saying whether it resumed from a
checkpoint. A retried task (after its worker died) reopens the child run of its earlier attempt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from archipelago.experts.training import TrainResult
from archipelago.platform import steps, tracking
from archipelago.platform.islands import current_placement

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


def _tracked(name: str, target: TrackingTarget | None, tags: dict[str, Any], train) -> dict[str, Any]:
    placement = current_placement()
    logger.warning("%s starting on node %s (island %s, pid %s)", name, placement["node_id"], placement["island"],
                   placement["pid"])
    if target is None:
        return _report(name, train(None), placement)
    all_tags = {**tags, "node": placement["node_id"], "island": placement["island"], "hostname": placement["hostname"]}
    with tracking.ChildRun(target.uri, target.parent_id, name, all_tags) as child:
        result = train(child.log)
        child.set_tags({"resumed_from": result.resumed_from, "checkpoint": result.checkpoint})
        return _report(name, result, placement)


def train_expert_task(run_dir: str, k: int, target: TrackingTarget | None = None) -> dict[str, Any]:
    """Train (or resume) expert k, tracked as a child run."""
    summary = steps.partition(run_dir)
    if not 0 <= k < len(summary["sizes"]):
        raise ValueError(f"expert {k} does not exist: the run has experts 0..{len(summary['sizes']) - 1}")
    tags = {"expert": k, "partition_size": summary["sizes"][k], "data_fingerprint": summary["data_fingerprint"]}
    return _tracked(f"expert-{k}", target, tags, lambda on_log: steps.train_expert_step(run_dir, k, on_log))


def train_router_task(run_dir: str, target: TrackingTarget | None = None) -> dict[str, Any]:
    """Train (or resume) the router, tracked as a child run."""
    summary = steps.partition(run_dir)
    tags = {"router": True, "partition_sizes": summary["sizes"], "data_fingerprint": summary["data_fingerprint"]}
    return _tracked("router", target, tags, lambda on_log: steps.train_router_step(run_dir, on_log))
