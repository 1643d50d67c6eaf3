"""Sampling from an ensemble of experts with a routing strategy (DDM, Sec. 3.3 and Table 2).

`SampleRequest` is the one request type of every front end (the SDK, the command line and the
MLflow model) and holds the one set of sampling defaults. `sample_ensemble` serves it: per batch
it fixes the per-trajectory expert first where the strategy asks for one (`sample`: k ~ p(k | x_1,
t = 1); `oracle`: trajectories dealt to clusters in proportion to their sizes, i.e. the
class-conditional mixture with the true cluster prior), *then* draws the template (the sizes of
variable-size samples) from that expert's statistics, or from the merged statistics of all
partitions for per-step strategies; it draws x_1 from the priors, sets the conditions and the given
entries, builds the `Ensemble` and integrates it with a named solver. It reports network
evaluations per sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from archipelago.experts.batch import Batch, concat, select
from archipelago.experts.conditions import condition_batch
from archipelago.experts.domain import Domain, Statistics, merge_statistics
from archipelago.experts.solvers import SOLVERS, Given, draw_prior, integrate
from archipelago.experts.training import pick_device
from archipelago.router.ensemble import FIXED, Ensemble, Strategy, draw_assignment
from archipelago.router.likelihood import LikelihoodRouter
from archipelago.router.training import Router


class SampleRequest(BaseModel):
    """What to generate and how; every front end passes this through unchanged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The descriptions double as the help text of the command line's flags.
    n: int = Field(16, ge=1, description="number of samples")
    model: Literal["ensemble", "student", "dense"] = Field(
        "ensemble", description="what samples: the ensemble, its few-step (reflow) student or its dense student "
                                "(students after `archipelago distill`)")
    strategy: Strategy = Field(Strategy.SAMPLE, description="routing: sample (the default: one expert per "
                            "trajectory, drawn from the router at t = 1), full, topk, top1, oracle, stochastic, switch")
    solver: str = Field("heun", description="ODE solver: euler, heun, rk4")
    steps: int = Field(50, ge=1, description="solver steps from t = 1 to t = 0")
    seed: int = Field(0, description="seeds the priors, the assignment and discrete steps")
    top_k: int = Field(2, ge=1, description="experts per step with strategy topk")
    switch: float = Field(0.5, ge=0, le=1, description="strategy switch: the share of the trajectory, from the "
                                                       "noise, under the full mixture before top-1")
    router_every: int = Field(1, ge=1, description="call the router at every m-th solver call, reusing its answer")
    router: Literal["trained", "likelihood"] = Field("trained", description="p(k | x_t, t): the trained router, or "
                                                     "the experts' own likelihoods (no router network)")
    likelihood_draws: int = Field(8, ge=1, description="router likelihood: noise draws per routing call")
    batch_size: int = Field(1024, ge=1, description="samples integrated at once")
    device: str | None = Field(None, description="torch device; None: CUDA when present, else CPU")
    conditions: dict[str, Any] = Field({}, description="condition name -> one value for all samples, or n values")
    guidance: float = Field(1.0, description="classifier-free guidance scale: 1 the conditional model, "
                                             "0 the unconditional")
    given: dict[str, Any] = Field({}, description="field name -> values fixed by the user (NaN or -1 where free)")
    progress: bool = Field(False, description="show a progress bar")

    @field_validator("solver")
    @classmethod
    def _known_solver(cls, solver: str) -> str:
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
        return solver

    @field_validator("device")
    @classmethod
    def _present_device(cls, device: str | None) -> str | None:
        check_device(device)
        return device


def check_device(device: str | None) -> torch.device:
    """The torch device of a setting, or an error naming it when it is not present on this machine."""
    try:
        chosen = pick_device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: {error}") from error
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r} is not present on this machine ({torch.cuda.device_count()} CUDA devices)")
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use cpu or cuda[:index]")
    return chosen


@dataclass(frozen=True)
class Generated:
    """Generated samples (in the domain's tensor form), which expert drew each per-trajectory sample,
    and what they cost."""

    batch: Batch
    expert_calls_per_sample: float
    router_calls_per_sample: float
    assignment: Tensor | None = None  # [n] the expert of each sample (per-trajectory strategies)
    attribution: Tensor | None = None  # [n, K] each expert's weight averaged along the trajectory
    trace: Tensor | None = None  # [n, calls] the main expert at every solver call (the routing trace)
    noise: Batch | None = None  # x_1 of every sample (with its template's tensors), when asked to keep it


def oracle_assignment(n: int, cluster_sizes: Sequence[int], generator: torch.Generator | None) -> Tensor:
    """n trajectories dealt to clusters in proportion to their sizes (largest remainders), shuffled."""
    sizes = torch.tensor(cluster_sizes, dtype=torch.float64)
    quota = sizes / sizes.sum() * n
    counts = quota.floor().long()
    remainder_order = torch.argsort(quota - counts, descending=True, stable=True)
    counts[remainder_order[: n - int(counts.sum())]] += 1
    labels = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    return labels[torch.randperm(n, generator=generator)]


def check_request(domain: Domain, request: SampleRequest, router: Router | None,
                  cluster_sizes: Sequence[int] | None, num_experts: int | None = None) -> None:
    """Every check of a request against the run, before any sampling work; errors name the bad input.

    A `top_k` the user set above the number of experts is an error (the default 2 is capped at K).
    """
    if (request.strategy is Strategy.TOPK and "top_k" in request.model_fields_set and num_experts is not None
            and request.top_k > num_experts):
        raise ValueError(f"top_k {request.top_k} is more than the {num_experts} experts of the run")
    if request.guidance != 1 and not domain.conditions:
        raise ValueError(f"guidance {request.guidance} needs conditions; the {domain.name} domain has none")
    condition_batch(domain.conditions, request.conditions, request.n)
    if request.router == "likelihood":
        if cluster_sizes is None:
            raise ValueError("router 'likelihood' needs the cluster sizes of the partition")
        LikelihoodRouter([nn.Identity()] * len(cluster_sizes), domain.fields, cluster_sizes)  # checks the fields
    elif request.strategy not in FIXED and router is None and cluster_sizes is not None and len(cluster_sizes) > 1:
        raise ValueError(f"strategy {request.strategy.value!r} needs a router; this run has none")
    if request.strategy is Strategy.ORACLE and cluster_sizes is None:
        raise ValueError("strategy 'oracle' needs the cluster sizes of the partition")
    if request.given:
        domain.given_values(_subset(request.given, torch.arange(request.n), request.n),
                            domain.template(request.n, torch.Generator().manual_seed(0), None, request.given))


def _subset(values: Mapping[str, Any], ids: Tensor, n: int) -> dict[str, Any]:
    """The per-sample entries `ids` of request values that hold n of them (others apply to every sample)."""
    def pick(value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) == n:
            return [value[i] for i in ids.tolist()]
        if hasattr(value, "shape") and len(value.shape) > 0 and value.shape[0] == n and not isinstance(value, str):
            return value[ids.numpy()]
        return value

    return {name: pick(value) for name, value in values.items()}


def _templates(domain: Domain, ids: Tensor, assignment: Tensor | None, statistics: Sequence[Statistics],
               given: Mapping[str, Any], n: int, generator: torch.Generator) -> Batch:
    """The template of samples `ids`: per expert from its own statistics when each sample has an
    expert, else from the merged statistics of all partitions."""
    if assignment is None:
        return domain.template(len(ids), generator, merge_statistics(statistics), _subset(given, ids, n))
    parts, order = [], []
    for k in torch.unique(assignment).tolist():
        mine = ids[assignment == k]
        own = statistics[k] if statistics else {}
        parts.append(domain.template(len(mine), generator, own, _subset(given, mine, n)))
        order.append(torch.nonzero(assignment == k).squeeze(1))
    grouped = concat(parts, domain.layout)
    return select(grouped, domain.layout, torch.argsort(torch.cat(order)))[0]


def sample_ensemble(domain: Domain, experts: Sequence[nn.Module], router: Router | None, request: SampleRequest,
                    cluster_sizes: Sequence[int] | None = None, statistics: Sequence[Statistics] = (),
                    decode: Any = None, keep_noise: bool = False, coupled: bool = False) -> Generated:
    """Generate `request.n` samples in batches of at most `request.batch_size` (see the module docstring).

    `statistics` are the per-expert statistics (empty when the domain has none); `decode`, when
    given, maps generated latents back to the records' fields (the run's codec); `keep_noise`
    keeps each sample's x_1 (distillation's pairs); both it and `coupled` draw discrete fields'
    reveal noise up front (see `MaskedPath`), the input of a few-step student.
    """
    check_request(domain, request, router, cluster_sizes, len(experts))
    device = check_device(request.device)
    generator = torch.Generator().manual_seed(request.seed)
    if request.router == "likelihood":
        router = LikelihoodRouter(experts, domain.fields, cluster_sizes, request.likelihood_draws, generator)
    parts, assignments, attributions, traces, noises, expert_calls, router_calls = [], [], [], [], [], 0, 0
    alone = len(experts) == 1 and router is None  # one network without a router (a student): nothing to draw
    for start in range(0, request.n, request.batch_size):
        ids = torch.arange(start, min(start + request.batch_size, request.n))
        if alone:  # every trajectory is the one network's
            assignment = torch.zeros(len(ids), dtype=torch.long) if request.strategy in FIXED else None
        else:
            assignment = _assignment(domain, request, router, cluster_sizes, statistics, ids, generator)
        template = _templates(domain, ids, assignment, statistics, request.given, request.n, generator)
        template.update(condition_batch(domain.conditions, _subset(request.conditions, ids, request.n), len(ids)))
        given = {name: Given.from_values(values) for name, values in
                 domain.given_values(_subset(request.given, ids, request.n), template).items()}
        x_1 = {name: value.to(device) for name, value in draw_prior(domain.fields, template, generator,
                                                                       coupled or keep_noise).items()}
        ensemble = Ensemble(experts, router, domain.fields, request.strategy, top_k=request.top_k,
                            assignment=None if assignment is None else assignment.to(device), layout=domain.layout,
                            conditions=domain.conditions, guidance=request.guidance, switch=request.switch,
                            router_every=request.router_every, generator=generator)
        out = integrate(ensemble, x_1, domain.fields, request.solver, request.steps, generator, request.progress,
                        given={name: Given(g.values.to(device), g.mask.to(device)) for name, g in given.items()})
        ensemble.check_finite()
        if keep_noise:
            noises.append({name: value.cpu() for name, value in x_1.items()})
        attributions.append(ensemble.attribution().float().cpu())
        traces.append(ensemble.trace())
        parts.append({name: value.cpu() for name, value in (decode(out) if decode else out).items()})
        assignments.append(assignment)
        expert_calls += ensemble.evaluations.expert
        drawn = request.strategy is Strategy.SAMPLE and not alone  # the router asked once, at t = 1
        router_calls += ensemble.evaluations.router + (len(ids) if drawn else 0)
    expert_calls += getattr(router, "expert_calls", 0)  # the likelihood router calls the experts
    return Generated(batch=concat(parts, domain.layout if decode is None else {}), assignment=None
                     if assignments[0] is None else torch.cat(assignments),
                     expert_calls_per_sample=expert_calls / request.n, router_calls_per_sample=router_calls / request.n,
                     attribution=torch.cat(attributions), trace=torch.cat(traces),
                     noise=concat(noises, domain.layout) if keep_noise else None)


def _assignment(domain: Domain, request: SampleRequest, router: Router | None, cluster_sizes: Sequence[int] | None,
                statistics: Sequence[Statistics], ids: Tensor, generator: torch.Generator) -> Tensor | None:
    """The expert of each trajectory, drawn before its template, for the per-trajectory strategies."""
    if request.strategy is Strategy.ORACLE:
        return oracle_assignment(len(ids), cluster_sizes, generator)
    if request.strategy is not Strategy.SAMPLE:
        return None
    if router is None:
        raise ValueError("strategy 'sample' needs a router")
    # p(k | x_1, t = 1) on noise drawn from the merged template; the trajectory's own template is drawn next.
    probe = _templates(domain, ids, None, statistics, request.given, request.n, generator)
    probe.update(condition_batch(domain.conditions, _subset(request.conditions, ids, request.n), len(ids)))
    x_1 = draw_prior(domain.fields, probe, generator)
    device = next(router.parameters(), torch.empty(0)).device
    return draw_assignment(router, {k: v.to(device) for k, v in x_1.items()}, domain.fields, generator).cpu()
