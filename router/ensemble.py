"""The ensemble of experts: a denoiser with the calling convention of one expert (DDM, Eq. 6).

    u_t(x_t) = sum_k w_k(x_t, t) u_t^(k)(x_t)

with weights from the router p(k | x_t, t) according to a routing strategy:

- `full`:   w = p(k | x_t, t), every expert runs on every sample;
- `topk`:   the k most probable experts, weights renormalized to sum to 1;
- `top1`:   the most probable expert, re-chosen at every call for every sample (DDM's best);
- `sample`: one expert per trajectory, drawn once from p(k | x_1, t=1) (see `draw_assignment`);
- `oracle`: one expert per trajectory, the true partition (for evaluation);
- `stochastic`: one expert per sample and call, drawn from p(k | x_t, t): top-1's cost, and in
  expectation the full mixture's velocity (so over many small steps its samples approach the full
  mixture's);
- `switch`: the full mixture over the first `switch` share of the trajectory (t > 1 - switch),
  top-1 after it: switch 0 is top-1, switch 1 the full mixture.

`router_every` = m calls the router at every m-th call only and reuses its posterior in between
(m = 1: every call). Only experts with a non-zero weight run, each on its own group of the batch,
so `top1` costs one expert call per sample. `evaluations` counts expert and router calls per
sample for reporting; `attribution` and `trace` say which experts made each sample.

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
    STOCHASTIC = "stochastic"
    SWITCH = "switch"


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
                 layout: Layout | None = None, conditions: Conditions | None = None, guidance: float = 1.0,
                 switch: float = 0.5, router_every: int = 1, generator: torch.Generator | None = None):
        super().__init__()
        if not 0 <= switch <= 1:
            raise ValueError(f"switch must lie in [0, 1] (the share of the trajectory under the full mixture), "
                             f"got {switch}")
        if router_every < 1:
            raise ValueError(f"router_every must be >= 1 (call the router every m-th step), got {router_every}")
        if guidance != 1 and not conditions:
            raise ValueError(f"guidance {guidance} needs a domain with conditions; this one has none")
        self.strategy = Strategy(strategy)
        if self.strategy in FIXED and assignment is None:
            raise ValueError(f"strategy {self.strategy.value!r} needs a per-sample expert assignment")
        if self.strategy not in FIXED and router is None and len(experts) > 1:  # one network routes nothing
            raise ValueError(f"strategy {self.strategy.value!r} needs a router")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.experts, self.router, self.fields = nn.ModuleList(experts), router, fields
        self.layout = layout or as_layout(fields)
        self.top_k, self.assignment = top_k, assignment
        self.switch, self.router_every, self.generator = float(switch), router_every, generator
        self._posterior: dict[bool, Tensor] = {}  # the router's last answer per pass (conditional or not)
        self._trace: list[Tensor] = []  # per call, each sample's main expert
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

    def weights(self, x_t: Batch, t: Tensor, unconditional: bool = False) -> Tensor:
        """w_k(x_t, t) for every sample and expert, [B, K] (`unconditional`: guidance's second pass)."""
        if len(self.experts) == 1:  # one network: nothing to route, the router is not called
            return torch.ones(len(t), 1, dtype=t.dtype, device=t.device)
        if self.strategy in FIXED:
            return nn.functional.one_hot(self.assignment.to(t.device), len(self.experts)).to(t.dtype)
        posterior = self.posterior(x_t, t, unconditional)
        if self.strategy is Strategy.STOCHASTIC:
            drawn = torch.multinomial(posterior.float().cpu(), 1, generator=self.generator).squeeze(1)
            return nn.functional.one_hot(drawn.to(t.device), len(self.experts)).to(t.dtype)
        if self.strategy is Strategy.SWITCH:
            mixed = (t > 1 - self.switch) if self.switch < 1 else torch.ones_like(t, dtype=torch.bool)
            return torch.where(mixed[:, None], posterior, routing_weights(posterior, Strategy.TOP1))
        return routing_weights(posterior, self.strategy, self.top_k)

    def posterior(self, x_t: Batch, t: Tensor, unconditional: bool = False) -> Tensor:
        """p(k | x_t, t) from the router, asked at every `router_every`-th solver call and reused in
        between (one answer kept per guidance pass)."""
        last = self._posterior.get(unconditional)
        if last is None or self._calls % self.router_every == 0 or len(last) != len(t):
            self.evaluations.router += len(t)
            last = self._posterior[unconditional] = self.router.posterior(x_t, t).to(t.dtype)
        return last

    def forward(self, x_t: Batch, t: Tensor) -> dict[str, Tensor]:
        conditional = self.mixture(x_t, t)
        if self.guidance != 1:
            unconditional = self.mixture(null_conditions(x_t, self.conditions), t, unconditional=True)
        self._calls += 1
        if self.guidance == 1:
            return conditional
        return {name: spec.path.guide(unconditional[name], conditional[name], self.guidance)
                for name, spec in self.fields.items()}

    def attribution(self) -> Tensor:
        """Each sample's expert weights averaged over every call along its trajectory, [B, K]: the
        share of the ensemble's velocity (or posterior) that each expert contributed, i.e. which
        partitions made the sample. Solver calls are evenly spaced in t for the Euler, Heun and
        RK4 grids, so the mean is the trajectory integral of w_k(x_t, t) dt up to the quadrature."""
        if self._routed is None:
            raise RuntimeError("the ensemble has not been called yet")
        return self._routed / len(self._trace)

    def trace(self) -> Tensor:
        """Each sample's main expert (the largest weight) at every call, [B, calls]."""
        return torch.stack(self._trace, dim=1)

    def mixture(self, x_t: Batch, t: Tensor, unconditional: bool = False) -> dict[str, Tensor]:
        """sum_k w_k(x_t, t) u^(k)(x_t): the routed mixture of the experts' mixable quantities (the
        conditional pass is what `attribution` and `trace` record)."""
        w = self.weights(x_t, t, unconditional)  # [B, K]
        if not unconditional:
            self._routed = w.detach() if self._routed is None else self._routed + w.detach()
            self._trace.append(w.detach().argmax(dim=1).cpu())
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
