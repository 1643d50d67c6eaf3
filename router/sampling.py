"""Sampling from an ensemble of experts with a routing strategy (DDM, Sec. 3.3 and Table 2).

`sample_ensemble` draws x_1 from the priors, fixes the per-trajectory expert where the strategy
asks for one (`sample`: k ~ p(k | x_1, t=1); `oracle`: trajectories dealt to clusters in proportion
to their sizes, i.e. the class-conditional mixture with the true cluster prior), builds the
`Ensemble` and integrates it with a named solver. It reports network evaluations per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archipelago.experts.batch import Batch, num_samples
from archipelago.experts.domain import Domain
from archipelago.experts.solvers import draw_prior, integrate
from archipelago.router.ensemble import Ensemble, Strategy, draw_assignment
from archipelago.router.training import Router


@dataclass(frozen=True)
class Generated:
    """Generated samples (in the domain's tensor form) and what they cost."""

    batch: Batch
    expert_calls_per_sample: float
    router_calls_per_sample: float


def oracle_assignment(n: int, cluster_sizes: Sequence[int], generator: torch.Generator | None) -> Tensor:
    """n trajectories dealt to clusters in proportion to their sizes (largest remainders), shuffled."""
    sizes = torch.tensor(cluster_sizes, dtype=torch.float64)
    quota = sizes / sizes.sum() * n
    counts = quota.floor().long()
    remainder_order = torch.argsort(quota - counts, descending=True, stable=True)
    counts[remainder_order[: n - int(counts.sum())]] += 1
    labels = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    return labels[torch.randperm(n, generator=generator)]


def _assignment(strategy: Strategy, router: Router | None, x_1: Batch, domain: Domain, n: int,
                cluster_sizes: Sequence[int] | None, generator: torch.Generator | None) -> Tensor | None:
    if strategy is Strategy.SAMPLE:
        if router is None:
            raise ValueError("strategy 'sample' needs a router")
        return draw_assignment(router, x_1, domain.fields, generator)
    if strategy is Strategy.ORACLE:
        if cluster_sizes is None:
            raise ValueError("strategy 'oracle' needs the cluster sizes of the partition")
        return oracle_assignment(n, cluster_sizes, generator)
    return None


def sample_ensemble(domain: Domain, experts: Sequence[nn.Module], router: Router | None, n: int,
                    strategy: Strategy | str = Strategy.TOP1, solver: str = "heun", steps: int = 50,
                    seed: int = 0, top_k: int = 2, cluster_sizes: Sequence[int] | None = None,
                    batch_size: int = 1024, progress: bool = False) -> Generated:
    """Generate n samples in batches of at most `batch_size` (see the module docstring)."""
    strategy = Strategy(strategy)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    generator = torch.Generator().manual_seed(seed)
    parts, expert_calls, router_calls = [], 0, 0
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        x_1 = draw_prior(domain.fields, domain.template(count, generator), generator)
        assignment = _assignment(strategy, router, x_1, domain, count, cluster_sizes, generator)
        ensemble = Ensemble(experts, router, domain.fields, strategy, top_k=top_k, assignment=assignment)
        parts.append(integrate(ensemble, x_1, domain.fields, solver, steps, generator, progress))
        expert_calls += ensemble.evaluations.expert
        router_calls += ensemble.evaluations.router + (count if strategy is Strategy.SAMPLE else 0)
    return Generated(batch=concat_batches(parts, domain), expert_calls_per_sample=expert_calls / n,
                     router_calls_per_sample=router_calls / n)


def concat_batches(parts: Sequence[Batch], domain: Domain) -> Batch:
    """Concatenate batches sample-wise, shifting the index tensors of variable-size fields."""
    indices = {spec.index for spec in domain.fields.values() if spec.index is not None}
    out: Batch = {}
    offset = 0
    shifted: dict[str, list[Tensor]] = {name: [] for name in indices}
    for part in parts:
        for name in indices:
            shifted[name].append(part[name] + offset)
        offset += num_samples(part, domain.fields)
    for name in parts[0]:
        out[name] = torch.cat(shifted[name] if name in indices else [p[name] for p in parts])
    return out
