"""Islands as separate Ray clusters: one island's part of a fit, and the assembly once all are done.

When every island is its own Ray cluster (its own head, no shared network or scheduler), a fit
runs as one job per island, `archipelago fit --island <name>` (submitted with `archipelago submit
--island <name> --address <that cluster>`), and the islands share nothing but the run's storage:

1. each island's job checks, ingests and partitions the run unless another island did already
   (the run's lease orders them; the second finds the same run and goes on);
2. it assigns its experts to itself in the manifest (`archipelago.platform.manifest`): those the
   config places on the island, or the experts it names, which moves them there from an island
   that is gone (refused while a live trainer holds one);
3. it trains them as Ray tasks on its own cluster, each resuming from its latest checkpoint;
4. `archipelago assemble` (anywhere the storage is reachable) refuses while any expert is not
   done, naming each with its island and state; once all are, it trains the router in its own
   process (unless it is trained already) and assembles the ensemble.

The same submission twice trains nothing twice: the job is submitted once per settings and island
(`archipelago.platform.jobs`), and a resumed expert that reached its steps returns at once.
"""

from __future__ import annotations

from typing import Any

from archipelago.experts import storage
from archipelago.experts.domain import Domain
from archipelago.platform import manifest, steps
from archipelago.platform.config import RunConfig
from archipelago.platform.runner import FitResult, Launch, absolute_run_dir, preflight, prepare_steps, train_parts
from archipelago.platform.status import run_status
from archipelago.platform.tasks import TrackingTarget, train_router_task

PREPARE_WAIT_S = 900.0  # how long an island waits while another island's job ingests and partitions


class ExpertsNotDone(RuntimeError):
    """Some expert has not reached its steps, so the ensemble cannot be assembled yet."""


def island_experts(config: RunConfig, run_dir: str, island: str, experts: list[int] | None = None) -> list[int]:
    """The experts an island trains: `experts` when given, else those assigned to it in the
    manifest, or placed on it by the config and assigned nowhere else. Works before the run is
    partitioned (then the experts are the config's 0..K-1)."""
    partitioned = storage.exists(storage.join(run_dir, steps.PARTITION_FILE))
    ids = steps.expert_ids(run_dir) if partitioned else list(range(config.experts))
    if experts:
        unknown = sorted(set(experts) - set(ids))
        if unknown:
            raise ValueError(f"experts {unknown} do not exist: the run's experts are {ids}")
        return sorted(set(experts))
    records = manifest.read_all(run_dir)
    placed = {k: records.get(k, {}).get("island") or config.placement_of(k).island for k in ids}
    mine = [k for k, where in placed.items() if where == island]
    if not mine:
        raise ValueError(f"no expert of {run_dir} is placed on island {island!r} (islands by expert: {placed}); "
                         f"set placement in the config, or name the experts to move there")
    return mine


def fit_island(config: RunConfig, run_dir: str, island: str, launch: Launch, experts: list[int] | None = None,
               source: Any = None, domain: Domain | None = None) -> FitResult:
    """Run (or resume) one island's part of a fit (see the module docstring); no router, no assembly."""
    run_dir = absolute_run_dir(run_dir)
    island_experts(config, run_dir, island, experts)  # refuse an island with nothing to do before any work
    domain = preflight(config, run_dir, launch, domain, islands_here={island} if launch.ray else set())
    with steps.run_lease(run_dir, f"archipelago fit --island {island}", launch.wait or PREPARE_WAIT_S):
        prepare_steps(config, run_dir, source, domain)
    ids = island_experts(config, run_dir, island, experts)
    manifest.assign(run_dir, {k: steps.expert_dir(run_dir, k) for k in ids}, island)
    placed = {k: island if launch.ray else None for k in ids}
    if not launch.track:
        return FitResult(run_dir, None, None, train_parts(config, run_dir, None, launch, placed, router=False))
    from archipelago.platform import tracking

    uri = tracking.resolve_tracking_uri(launch.tracking_uri)
    parent = tracking.start_parent(uri, launch.experiment, config.model_dump(mode="json"), run_dir,
                                   run_name=f"island-{island}")
    with tracking.finishing(uri, parent):
        results = train_parts(config, run_dir, TrackingTarget(uri, parent), launch, placed, router=False)
    return FitResult(run_dir, parent, None, results)


def check_experts_done(run_dir: str) -> None:
    """Raise ExpertsNotDone naming every expert that has not reached its steps, with its island,
    state and step (and the error of a failed one)."""
    missing = [e for e in run_status(run_dir)["experts"] if e["state"] != "done"]
    if missing:
        described = "; ".join(_describe(e) for e in missing)
        raise ExpertsNotDone(f"cannot assemble {run_dir}: {len(missing)} expert(s) not done: {described}. Train "
                             f"them (archipelago fit --island NAME, or submit it) and assemble again")


def _describe(expert: dict[str, Any]) -> str:
    where = f"island {expert['island']}" if expert["island"] else "no island"
    text = f"expert {expert['expert']} ({where}, {expert['state']}, step {expert['step'] or 0} of {expert['steps']}"
    return text + (f": {expert['error']})" if expert.get("error") else ")")


def assemble_run(run_dir: str, target: TrackingTarget | None = None, wait: bool | float = False
                 ) -> dict[str, Any] | None:
    """Once every expert is done: train the router here unless it is done, then assemble (holding
    the run's lease). Returns the router's training report, or None when it was trained already."""
    check_experts_done(run_dir)
    with steps.run_lease(run_dir, "archipelago assemble", wait):
        router = run_status(run_dir)["router"]
        report = None if router["state"] == "done" else train_router_task(run_dir, target)
        steps.assemble(run_dir)
    return report
