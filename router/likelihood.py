"""Routing by the experts' own likelihoods, with no router network (after "Your Diffusion Model is
Secretly a Zero-Shot Classifier", Li et al. 2023, carried from clean data to x_t).

    p(k | x_t, t)  proportional to  n_k p_t^k(x_t)

where p_t^k is expert k's marginal at time t and n_k its cluster size. On the experts' path
x_s = (1 - s) x_0 + s eps, the same path continued from y = x_t is x_s = a_s y + b_s e with
a_s = (1 - s) / (1 - t) and b_s^2 = s^2 - a_s^2 t^2, whose end x_1 is N(0, I) whatever y is. The
continuous-time ELBO of y under expert k (Song et al. 2021), exact for an expert with the exact
score since the forward and reverse path measures then agree, gives

    log p_t^k(y) = C(y) - int_t^1 (s / (1 - s)) E_e || s_k(x_s, s) + e / b_s ||^2 ds,

with the score s_k = -(x_s + (1 - s) v_k) / s of the expert's velocity v_k. Dropping the terms
that are the same for every expert (they cancel in the posterior) and pairing every draw e with
-e (antithetic, which removes the 1 / b_s blow-up at s -> t) leaves the denoising error

    D_k = mean over +-: [2 x_s . v_k(x_s) + (1 - s) |v_k(x_s)|^2] / s  -  (v_k(x_+) - v_k(x_-)) . e / b_s,

    log p(k | y, t) = log n_k - (1 - t) E_{s ~ U(t, 1), e} D_k + const,

estimated with `draws` pairs (s, e), the same for every expert (common random numbers). Cost:
2 `draws` calls of every expert per sample and routing call. Gaussian dense fields only: a torus
or categorical field has no such closed-form continuation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from archipelago.experts.batch import Batch, Fields, with_fields
from archipelago.experts.conventions import Prediction
from archipelago.experts.paths import GaussianPath


class LikelihoodRouter(nn.Module):
    """p(k | x_t, t) from the experts' denoising errors (see the module docstring); a drop-in for
    `Router` in an `Ensemble`."""

    def __init__(self, experts: Sequence[nn.Module], fields: Fields, cluster_sizes: Sequence[int], draws: int = 8,
                 generator: torch.Generator | None = None):
        super().__init__()
        if draws < 1:
            raise ValueError(f"likelihood routing needs draws >= 1, got {draws}")
        if len(cluster_sizes) != len(experts):
            raise ValueError(f"{len(cluster_sizes)} cluster sizes for {len(experts)} experts")
        for name, spec in fields.items():
            if not isinstance(spec.path, GaussianPath) or spec.index is not None:
                raise ValueError(f"likelihood routing needs dense Gaussian fields; field {name!r} is "
                                 f"{type(spec.path).__name__}{' with variable size' if spec.index else ''}")
        for k, expert in enumerate(experts):
            prediction = getattr(expert, "prediction", Prediction.VELOCITY)
            if not hasattr(expert, "fields") and Prediction(prediction) is not Prediction.VELOCITY:
                raise ValueError(f"expert {k} predicts {Prediction(prediction).value} and is not a Denoiser, which "
                                 f"would convert it: likelihood routing needs every expert's velocity")
        self.experts, self.fields, self.draws, self.generator = nn.ModuleList(experts), fields, draws, generator
        self.register_buffer("log_sizes", torch.log(torch.as_tensor(cluster_sizes, dtype=torch.float64)))
        self.expert_calls = 0  # expert evaluations, summed over samples

    def posterior(self, x_t: Batch, t: Tensor) -> Tensor:
        b = len(t)
        error = torch.zeros(b, len(self.experts), dtype=torch.float64, device=t.device)
        for _ in range(self.draws):
            s = t + (1 - t) * torch.rand(b, generator=self.generator, dtype=torch.float64).to(t.device)
            a = (1 - s) / (1 - t).clamp_min(1e-12)
            sd = (s**2 - a**2 * t**2).clamp_min(1e-24).sqrt()
            noise = {name: torch.randn(x_t[name].shape, generator=self.generator, dtype=torch.float64)
                     .to(x_t[name].device) for name in self.fields}
            for sign in (1.0, -1.0):
                x_s = {name: _rows(a, x_t[name]) * x_t[name] + sign * _rows(sd, x_t[name]) * noise[name]
                       for name in self.fields}
                batch = with_fields(x_t, self.fields, {k: v.to(x_t[k].dtype) for k, v in x_s.items()})
                for k, expert in enumerate(self.experts):
                    v = expert(batch, s.to(t.dtype))
                    self.expert_calls += b
                    for name in self.fields:
                        vk, xs = v[name].double(), x_s[name]
                        error[:, k] += (_sum(2 * xs * vk + _rows(1 - s, vk) * vk**2) / (2 * s)
                                        - sign * _sum(vk * noise[name]) / sd)
        log_posterior = self.log_sizes.to(t.device) - (1 - t.double())[:, None] * error / self.draws
        return log_posterior.softmax(dim=1).to(t.dtype)


def _rows(values: Tensor, like: Tensor) -> Tensor:
    """A per-sample [B] tensor shaped to broadcast over a field [B, ...]."""
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(torch.float64)


def _sum(values: Tensor) -> Tensor:
    """The sum over every dimension but the first, [B]."""
    return values.reshape(len(values), -1).sum(dim=1)
