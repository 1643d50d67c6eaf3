"""A whole fit: preflight checks, then the steps of a run, in process or as Ray tasks on islands,
tracked in MLflow (one parent run, one child run per expert and one for the router).

Every check that can fail fast runs before anything is written: the config and the domain's config,
write permission on the run directory, a different run already there, the tracking server, the
Ray address, and a node on every island the placement names. Then the driver ingests and
partitions (cheap), the K experts and the router train in parallel (the router needs only the
data and the partition labels), and the ensemble is assembled and logged as an MLflow model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from archipelago.experts import storage
from archipelago.experts.domain import Domain
from archipelago.platform import islands, steps, tracking
from archipelago.platform.config import RunConfig, validate_domain
from archipelago.platform.tasks import TrackingTarget, train_expert_task, train_router_task


@dataclass(frozen=True)
class Launch:
    """Where the work runs and where it is tracked."""

    ray: bool = True  # False: every step in this process, one after the other
    address: str | None = None  # None: RAY_ADDRESS, else Ray started inside this process
    track: bool = True  # log to MLflow
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else MLflow's SQLite default in the cwd
    experiment: str = "archipelago"
    register: str | None = None  # register the ensemble model under this name
    island_wait_s: float = 60.0  # how long work waits for a node on its island
    max_retries: int = 3  # retries of a task whose worker died


@dataclass(frozen=True)
class FitResult:
    run_dir: str
    parent_run_id: str | None
    model_uri: str | None
    tasks: list[dict[str, Any]] = field(default_factory=list)


def preflight(config: RunConfig, run_dir: str, launch: Launch, domain: Domain | None = None) -> Domain:
    """Every check that needs no training, before anything is written (see the module docstring)."""
    domain = domain or validate_domain(config)
    if launch.track:
        tracking.check_tracking(tracking.resolve_tracking_uri(launch.tracking_uri))
    if launch.ray:
        islands.connect(launch.address)
        islands.require_islands(config.islands(), launch.island_wait_s)
    storage.check_writable(run_dir)
    steps.check_run_dir(config, run_dir)
    return domain


def _task_specs(config: RunConfig, run_dir: str, target: TrackingTarget | None, launch: Launch) -> list:
    env = {tracking.TRACKING_ENV: target.uri} if target else {}
    specs = []
    for k in range(config.experts):
        place = config.placement_of(k)
        specs.append(islands.TaskSpec(train_expert_task, (run_dir, k, target), name=f"expert-{k}", island=place.island,
                                      num_cpus=place.num_cpus, num_gpus=place.num_gpus,
                                      max_retries=launch.max_retries, env_vars=env))
    place = config.router_placement
    specs.append(islands.TaskSpec(train_router_task, (run_dir, target), name="router", island=place.island,
                                  num_cpus=place.num_cpus, num_gpus=place.num_gpus, max_retries=launch.max_retries,
                                  env_vars=env))
    return specs


def _train(specs: list, launch: Launch) -> list[dict[str, Any]]:
    if launch.ray:
        return islands.submit_tasks(specs, island_wait_s=launch.island_wait_s)
    return [spec.fn(*spec.args, **dict(spec.kwargs)) for spec in specs]


def fit(config: RunConfig, run_dir: str, source: Any = None, domain: Domain | None = None,
        launch: Launch = Launch()) -> FitResult:
    """Run (or resume) every step of a fit; see the module docstring."""
    run_dir = os.fspath(run_dir)
    if "://" not in run_dir:  # Ray workers and job nodes resolve relative paths in their own cwd
        run_dir = os.path.abspath(run_dir)
    domain = preflight(config, run_dir, launch, domain)
    steps.prepare(config, run_dir, source=source, domain=domain)
    steps.partition(run_dir)
    steps.encode(run_dir)
    uri = tracking.resolve_tracking_uri(launch.tracking_uri) if launch.track else None
    parent = tracking.start_parent(uri, launch.experiment, config.model_dump(mode="json"), run_dir) if uri else None
    target = TrackingTarget(uri, parent) if uri else None
    try:
        results = _train(_task_specs(config, run_dir, target, launch), launch)
        steps.assemble(run_dir)
        model_uri = tracking.log_ensemble_model(uri, parent, run_dir, launch.register) if uri else None
    except BaseException:
        if uri:
            tracking.finish_run(uri, parent, failed=True)
        raise
    if uri:
        tracking.finish_run(uri, parent)
    return FitResult(run_dir=run_dir, parent_run_id=parent, model_uri=model_uri, tasks=results)
