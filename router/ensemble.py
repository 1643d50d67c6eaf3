"""The ensemble of experts: a denoiser with the calling convention of one expert (DDM, Eq. 6).

    u_t(x_t) = sum_k w_k(x_t, t) u_t^(k)(x_t)

with weights from the router p(k | x_t, t) according to a routing strategy:

- `full`:   w = p(k | x_t, t), every expert runs on every sample;
- `topk`:   the k most probable experts, weights renormalized to sum to 1;
- `top1`:   the most probable expert, re-chosen at every call for every sample (DDM's best);
- `sample`: one expert per trajectory, drawn once from p(k | x_1, t=1) (see `draw_assignment`);
- `oracle`: one expert per trajectory, the true partition (for evaluation).

Only experts with a non-zero weight run, each on its own group of the batch, so `top1` costs one
expert call per sample. `evaluations` counts expert and router calls per sample for reporting.

Classifier-free guidance meets the mixture on the mixed fields: the ensemble forms the conditional
mixture sum_k p(k | x_t, t, c) u^(k)(x_t | c) and the unconditional one sum_k p(k | x_t, t)
u^(k)(x_t), each routed by its own posterior, and guides between the two (`ProbabilityPath.guide`).
Those two mixtures are, by the DDM identity, the conditional and unconditional fields of the whole
data set, so guided full-mixture sampling is exactly classifier-free guidance of the monolith;
guiding each expert before mixing would not be (the router's weights differ with and without c).
At scale 1 the unconditional pass is skipped: the result is the plain conditional ensemble, exactly.
A guided step costs two passes, like a guided monolith.

An expert that returns NaN or infinite values (damaged or diverged weights) is noted on the device
without a sync; `check_finite`, called once per integrated batch, raises `NonFiniteOutput` naming
it, so non-finite samples are never written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor, nn

from archipelago.experts.batch import Batch, Fields, Layout, as_layout, num_samples, per_row, select
from archipelago.experts.conditions import Conditions, null_conditions
from archipelago.router.training import Router


class Strategy(StrEnum):
    FULL = "full"
    TOPK = "topk"
    TOP1 = "top1"
    SAMPLE = "sample"
    ORACLE = "oracle"


FIXED = (Strategy.SAMPLE, Strategy.ORACLE)  # strategies that keep one expert per trajectory


@dataclass
class Evaluations:
    """Network evaluations summed over samples (divide by the number of samples for per-sample)."""

    expert: int = 0
    router: int = 0


def routing_weights(posterior: Tensor, strategy: Strategy, top_k: int = 2) -> Tensor:
    """Per-sample expert weights [B, K] from the router's posterior [B, K]."""
    strategy = Strategy(strategy)
    if strategy is Strategy.FULL:
        return posterior
    k = 1 if strategy is Strategy.TOP1 else min(top_k, posterior.shape[1])
    values, chosen = posterior.topk(k, dim=1)
    weights = torch.zeros_like(posterior).scatter_(1, chosen, values)
    return weights / weights.sum(dim=1, keepdim=True)


class Ensemble(nn.Module):
    """Experts plus a router, callable as `ensemble(x_t, t) -> {field: mixable quantity}`."""

    def __init__(self, experts: Sequence[nn.Module], router: Router | None, fields: Fields,
                 strategy: Strategy | str = Strategy.TOP1, top_k: int = 2, assignment: Tensor | None = None,
                 layout: Layout | None = None, conditions: Conditions | None = None, guidance: float = 1.0):
        super().__init__()
        if guidance != 1 and not conditions:
            raise ValueError(f"guidance {guidance} needs a domain with conditions; this one has none")
        self.strategy = Strategy(strategy)
        if self.strategy in FIXED and assignment is None:
            raise ValueError(f"strategy {self.strategy.value!r} needs a per-sample expert assignment")
        if self.strategy not in FIXED and router is None:
            raise ValueError(f"strategy {self.strategy.value!r} needs a router")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.experts, self.router, self.fields = nn.ModuleList(experts), router, fields
        self.layout = layout or as_layout(fields)
        self.top_k, self.assignment = top_k, assignment
        self.conditions, self.guidance = dict(conditions or {}), float(guidance)
        self.evaluations = Evaluations()
        self._routed: Tensor | None = None  # the sum over calls of every sample's expert weights, [B, K]
        self._calls = 0
        self._non_finite: dict[tuple[int, str], Tensor] = {}  # (expert, field) -> a flag on the device

    def _note_non_finite(self, k: int, out: dict[str, Tensor]) -> None:
        """Remember, without a device sync on this hot path, whether expert k returned NaN or inf."""
        for name, value in out.items():
            if value.is_floating_point():
                flag, seen = ~torch.isfinite(value).all(), self._non_finite.get((k, name))
                self._non_finite[k, name] = flag if seen is None else seen | flag

    def check_finite(self) -> None:
        """Raise NonFiniteOutput naming each expert that returned NaN or infinite values since the
        ensemble was built (one device sync; call it once a batch is integrated)."""
        bad = sorted(f"expert {k} returned non-finite {name!r}" for (k, name), flag in self._non_finite.items()
                     if bool(flag))
        if bad:
            raise NonFiniteOutput(f"{'; '.join(bad)}: its weights may be damaged or diverged (retrain it from its "
                                  f"newest intact checkpoint); no samples were written")

    def weights(self, x_t: Batch, t: Tensor) -> Tensor:
        """w_k(x_t, t) for every sample and expert, [B, K]."""
        if self.strategy in FIXED:
            return nn.functional.one_hot(self.assignment.to(t.device), len(self.experts)).to(t.dtype)
        if len(self.experts) == 1:  # a monolith: nothing to route, the router is not called
            return torch.ones(len(t), 1, dtype=t.dtype, device=t.device)
        self.evaluations.router += len(t)
        return routing_weights(self.router.posterior(x_t, t).to(t.dtype), self.strategy, self.top_k)

    def forward(self, x_t: Batch, t: Tensor) -> dict[str, Tensor]:
        conditional = self.mixture(x_t, t)
        if self.guidance == 1:
            return conditional
        unconditional = self.mixture(null_conditions(x_t, self.conditions), t)
        return {name: spec.path.guide(unconditional[name], conditional[name], self.guidance)
                for name, spec in self.fields.items()}

    def attribution(self) -> Tensor:
        """Each sample's expert weights averaged over every call along its trajectory, [B, K]: the
        share of the ensemble's velocity (or posterior) that each expert contributed, i.e. which
        partitions made the sample. Solver calls are evenly spaced in t for the Euler, Heun and
        RK4 grids, so the mean is the trajectory integral of w_k(x_t, t) dt up to the quadrature."""
        if self._routed is None:
            raise RuntimeError("the ensemble has not been called yet")
        return self._routed / self._calls

    def mixture(self, x_t: Batch, t: Tensor) -> dict[str, Tensor]:
        """sum_k w_k(x_t, t) u^(k)(x_t): the routed mixture of the experts' mixable quantities."""
        w = self.weights(x_t, t)  # [B, K]
        self._routed = w.detach() if self._routed is None else self._routed + w.detach()
        self._calls += 1
        mixed: dict[str, Tensor] = {}
        runs = torch.ones_like(w, dtype=torch.bool) if self.strategy is Strategy.FULL else w > 0
        for k, expert in enumerate(self.experts):
            ids = torch.nonzero(runs[:, k]).squeeze(1)
            if len(ids) == 0:
                continue
            sub, rows = select(x_t, self.layout, ids)
            out = expert(sub, t[ids])
            self._note_non_finite(k, out)
            self.evaluations.expert += len(ids)
            for name, spec in self.fields.items():
                w_rows = per_row(w[ids, k], sub, spec)
                contribution = out[name] * w_rows.reshape(-1, *([1] * (out[name].dim() - 1)))
                if name not in mixed:
                    rows_total = x_t[name].shape[0]
                    mixed[name] = contribution.new_zeros((rows_total, *out[name].shape[1:]))
                mixed[name].index_add_(0, rows[name], contribution)
        return mixed


class NonFiniteOutput(FloatingPointError):
    """An expert returned NaN or infinite values: samples are never written from them."""


def draw_assignment(router: Router, x_1: Batch, fields: Fields, generator: torch.Generator | None) -> Tensor:
    """One expert per trajectory, k ~ p(k | x_1, t = 1) (the `sample` strategy)."""
    t = torch.ones(num_samples(x_1, fields), device=x_1[sorted(fields)[0]].device)
    with torch.no_grad():
        probs = router.posterior(x_1, t)
    return torch.multinomial(probs.float().cpu(), 1, generator=generator).squeeze(1).to(t.device)
