"""A whole fit: preflight checks, then the steps of a run, in process or as Ray tasks on islands,
tracked in MLflow (one parent run, one child run per expert and one for the router).

Every check that can fail fast runs before anything is written: the config and the domain's config,
the training devices, write permission on the run directory, a different run already there, the
tracking server, the Ray address, and a node on every island the placement names. Then the
driver ingests and partitions (cheap), the K experts and the router train in parallel (the router
needs only the data and the partition labels), and the ensemble is assembled and logged as an
MLflow model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from archipelago.experts import storage
from archipelago.experts.domain import Domain
from archipelago.platform import credentials, steps
from archipelago.platform.config import TRAININGS, RunConfig, validate_domain
from archipelago.platform.tasks import (
    TrackingTarget,
    train_expert_data_parallel_task,
    train_expert_task,
    train_router_task,
)
from archipelago.router.sampling import check_device


@dataclass(frozen=True)
class Launch:
    """Where the work runs and where it is tracked.

    The defaults are the command line's: `archipelago` is the platform's entry point, so a fit runs
    on Ray (a cluster, or an instance started inside the process) and is tracked in MLflow. The SDK
    (`sdk.fit`) runs in process and untracked unless asked: it serves notebooks and scripts, where
    starting Ray and writing ./mlflow.db uninvited is unwelcome; such a fit does not even import
    Ray or MLflow (this module imports them only for the launches that use them).
    """

    ray: bool = True  # False: every step in this process, one after the other
    address: str | None = None  # None: RAY_ADDRESS, else Ray started inside this process
    track: bool = True  # log to MLflow
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else MLflow's SQLite default in the cwd
    experiment: str = "archipelago"
    register: str | None = None  # register the ensemble model under this name
    island_wait_s: float = 60.0  # how long work waits for a node on its island
    max_retries: int = 3  # retries of a task whose worker died
    wait: bool = False  # wait while another writer holds the run directory's lease (else fail at once)


@dataclass(frozen=True)
class FitResult:
    run_dir: str
    parent_run_id: str | None
    model_uri: str | None
    tasks: list[dict[str, Any]] = field(default_factory=list)


def preflight(config: RunConfig, run_dir: str, launch: Launch, domain: Domain | None = None,
              islands_here: set[str] | None = None) -> Domain:
    """Every check that needs no training, before anything is written (see the module docstring).
    `islands_here`: the islands this launch needs (default: every island the config names)."""
    credentials.check_fit(config.model_dump(mode="json"), run_dir, launch)
    domain = domain or validate_domain(config)
    check_devices(config, launch)
    if launch.track:
        from archipelago.platform import tracking

        tracking.check_tracking(tracking.resolve_tracking_uri(launch.tracking_uri))
    if launch.ray:
        from archipelago.platform import islands

        islands.connect(launch.address)
        islands.require_islands(config.islands() if islands_here is None else islands_here, launch.island_wait_s)
    storage.check_writable(run_dir)
    steps.check_run_dir(config, run_dir)
    return domain


def check_devices(config: RunConfig, launch: Launch) -> None:
    """A training device that is not there is a ValueError naming the setting and the device.

    On Ray the experts and the router train in workers, which see a GPU only when their placement
    reserves one (Ray hides the others), so there a CUDA device needs `num_gpus` >= 1 on every
    placement it trains on; what trains in this process must find its device here.
    """
    on_workers = {"expert": [config.placement_of(k) for k in range(config.experts)],
                  "router": [config.router_placement]} if launch.ray else {}
    for name in TRAININGS:
        device = getattr(config, name).device
        if device is None:
            continue
        if name in on_workers and device.startswith("cuda"):
            if any(place.num_gpus == 0 for place in on_workers[name]):
                raise ValueError(f"{name}.device {device!r}: a Ray task sees a GPU only when it reserves one; "
                                 f"set num_gpus >= 1 in the {name}'s placement")
            continue
        try:
            check_device(device)
        except ValueError as error:
            raise ValueError(f"{name}.device: {error}") from error


def prepare(config: RunConfig, run_dir: str, launch: Launch, source: Any = None, domain: Domain | None = None) -> str:
    """A fit's first step: every preflight check, then ingest, partition and (with a codec) encode
    into the run directory (see `steps.prepare`, `steps.partition` and `steps.encode`). Returns the
    run directory, made absolute when it is a local path, because Ray workers and job nodes resolve
    relative paths in their own cwd."""
    run_dir = absolute_run_dir(run_dir)
    domain = preflight(config, run_dir, launch, domain)
    with steps.run_lease(run_dir, "archipelago partition", launch.wait):
        prepare_steps(config, run_dir, source, domain)
    return run_dir


def prepare_steps(config: RunConfig, run_dir: str, source: Any, domain: Domain) -> None:
    steps.prepare(config, run_dir, source=source, domain=domain)  # checks the run directory again, now leased
    steps.partition(run_dir)
    steps.encode(run_dir)


def absolute_run_dir(run_dir: str | os.PathLike) -> str:
    run_dir = os.fspath(run_dir)
    return run_dir if "://" in run_dir else os.path.abspath(run_dir)


def _task_specs(config: RunConfig, run_dir: str, target: TrackingTarget | None, launch: Launch,
                experts: dict[int, str | None], router: bool) -> list:
    """Ray tasks for `experts` (expert id: its island) and, with `router`, the router."""
    from archipelago.platform import islands

    env = {}
    if target:
        from archipelago.platform.tracking import TRACKING_ENV

        env = {TRACKING_ENV: target.uri}
    ray = {"max_retries": launch.max_retries, "env_vars": env, "kwargs": {"in_ray_worker": True}}
    specs = []
    for k, island in experts.items():
        place = config.placement_of(k)
        if place.workers > 1:  # Ray Train's workers reserve the resources; the task that drives them, none
            specs.append(islands.TaskSpec(train_expert_data_parallel_task, (run_dir, k, target, island),
                                          {"max_retries": launch.max_retries}, name=f"expert-{k}", island=island,
                                          num_cpus=0, max_retries=launch.max_retries, env_vars=env))
            continue
        specs.append(islands.TaskSpec(train_expert_task, (run_dir, k, target), name=f"expert-{k}", island=island,
                                      num_cpus=place.num_cpus, num_gpus=place.num_gpus, **ray))
    if router:
        place = config.router_placement
        specs.append(islands.TaskSpec(train_router_task, (run_dir, target), name="router", island=place.island,
                                      num_cpus=place.num_cpus, num_gpus=place.num_gpus, **ray))
    return specs


def train_parts(config: RunConfig, run_dir: str, target: TrackingTarget | None, launch: Launch,
                experts: dict[int, str | None] | None = None, router: bool = True) -> list[dict[str, Any]]:
    """Train `experts` (expert id: its island; default: every expert on its configured island) and,
    with `router`, the router: in this process one after the other, or as Ray tasks."""
    if experts is None:
        experts = {k: config.placement_of(k).island for k in steps.expert_ids(run_dir)}
    if not launch.ray:
        return [*(train_expert_task(run_dir, k, target) for k in experts),
                *([train_router_task(run_dir, target)] if router else [])]
    from archipelago.platform import islands

    specs = _task_specs(config, run_dir, target, launch, experts, router)
    return islands.submit_tasks(specs, island_wait_s=launch.island_wait_s)


def fit(config: RunConfig, run_dir: str, source: Any = None, domain: Domain | None = None,
        launch: Launch = Launch()) -> FitResult:
    """Run (or resume) every step of a fit, holding the run directory's lease; see the module docstring."""
    run_dir = absolute_run_dir(run_dir)
    domain = preflight(config, run_dir, launch, domain)
    with steps.run_lease(run_dir, "archipelago fit", launch.wait):
        prepare_steps(config, run_dir, source, domain)
        return train_and_assemble(config, run_dir, launch)


def train_and_assemble(config: RunConfig, run_dir: str, launch: Launch) -> FitResult:
    """Train (or resume) every expert and the router of a partitioned run directory, assemble the
    ensemble, and with tracking log it to MLflow (and register it when the launch says so)."""
    if not launch.track:
        results = train_parts(config, run_dir, None, launch)
        steps.assemble(run_dir)
        return FitResult(run_dir=run_dir, parent_run_id=None, model_uri=None, tasks=results)
    from archipelago.platform import tracking

    uri = tracking.resolve_tracking_uri(launch.tracking_uri)
    parent = tracking.start_parent(uri, launch.experiment, config.model_dump(mode="json"), run_dir)
    with tracking.finishing(uri, parent):
        results = train_parts(config, run_dir, TrackingTarget(uri, parent), launch)
        steps.assemble(run_dir)
        model_uri = tracking.log_ensemble_model(uri, parent, run_dir, launch.register)
        tracking.log_sample_grid(uri, parent, run_dir)
    return FitResult(run_dir=run_dir, parent_run_id=parent, model_uri=model_uri, tasks=results)
