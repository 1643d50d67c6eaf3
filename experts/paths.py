"""Probability paths, one per field type, behind one small interface.

A path couples a data field x_0 with noise x_1 along t in [0, 1] (t = 0 data, t = 1 noise) and
says, for that field: how to draw x_1, how to draw x_t with its training target, the training
loss, what *mixable* quantity a network output stands for, and how to move x_t to an earlier
time given that quantity.

The mixable quantity is what the DDM identity sums over experts with weights p(k | x_t, t):
the velocity for continuous fields (Euclidean or on the torus) and the posterior p(x_0 | x_t)
for categorical fields. Both mixtures are exact:

    u_t(x_t) = sum_k p(k | x_t, t) u_t^(k)(x_t),   p(x_0 | x_t) = sum_k p(k | x_t, t) p_k(x_0 | x_t).

Paths implemented:
- `GaussianPath`: affine Gaussian path x_t = alpha_t x_0 + sigma_t eps (flow matching by default).
- `TorusPath`: geodesic flow on the flat torus [0, 1)^d from data to uniform noise (periodic
  coordinates such as fractional atom positions; as in FlowMM / DiffCSP's wrapped setting).
- `MaskedPath`: the absorbing ("masked") discrete path over C categories: each entry stays x_0
  with probability 1 - t and is the mask token C otherwise (discrete flow matching).

Classifier-free guidance meets a path in `guide`: the mixable quantities of the unconditional and
the conditional model are combined with scale w (w = 1: the conditional model itself, w = 0: the
unconditional one): linearly for velocities, geometrically for posteriors (p_u^(1-w) p_c^w,
renormalized), which is the guided posterior of discrete classifier-free guidance.

Given entries (fixed by the user, never diffused) are left out of every loss through the sample's
`free` mask.

Every method takes `t` already laid out per row of the field (see `archipelago.experts.batch`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from archipelago.experts.conventions import LinearScheduler, Prediction, Scheduler, convert


@dataclass(frozen=True)
class PathSample:
    """A point on the path and what the network is trained to output there."""

    x_t: Tensor
    target: Tensor
    free: Tensor | None = None  # bool, True where the entry is generated; None: every entry is


def _free_mse(output: Tensor, sample: PathSample) -> Tensor:
    """Mean squared error over the generated entries only."""
    if sample.free is None:
        return F.mse_loss(output, sample.target)
    free = sample.free.expand_as(output)
    if not free.any():
        return output.sum() * 0.0
    return F.mse_loss(output[free], sample.target[free])


def _expand(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-row time [R] against a field [R, ...]."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(dtype=x.dtype if x.is_floating_point() else t.dtype)


class ProbabilityPath(ABC):
    """The interface every field type implements."""

    predictions: tuple[Prediction, ...] = (Prediction.VELOCITY,)
    stochastic_steps: bool = False  # its sampler's steps draw (they take `reveal_noise` for a coupled sampler)

    @abstractmethod
    def prior(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw x_1 with the shape of `like`."""

    @abstractmethod
    def sample(
        self, x_0: Tensor, t: Tensor, generator: torch.Generator | None, prediction: Prediction,
        noise: Tensor | None = None,
    ) -> PathSample:
        """Draw x_t ~ p_t(. | x_0) and the regression or classification target. With `noise`, the
        noise end x_1 of the path is given instead of drawn: x_t lies on the path between this x_0
        and this x_1 (a coupling, as reflow trains on)."""

    @abstractmethod
    def loss(self, output: Tensor, sample: PathSample) -> Tensor:
        """The scalar training loss of a network output against the target."""

    @abstractmethod
    def mixable(self, output: Tensor, x_t: Tensor, t: Tensor, prediction: Prediction) -> Tensor:
        """Turn a raw network output into the quantity that experts mix linearly."""

    @abstractmethod
    def step(
        self, x_t: Tensor, mixed: Tensor, t: Tensor, t_next: Tensor, generator: torch.Generator | None,
        reveal: Tensor | None = None,
    ) -> Tensor:
        """Move x_t from t to t_next < t given the (mixed) quantity; `reveal`: the path's reveal noise
        (see `reveal_noise`), which makes a stochastic step deterministic."""

    def reveal_noise(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """The randomness the sampler's steps draw, drawn up front instead (a coupled sampler, as a
        few-step student is trained on): None for paths whose steps draw nothing (an ODE from x_1)."""
        return None

    def match_loss(self, output: Tensor, teacher: Tensor, x_t: Tensor, t: Tensor, prediction: Prediction,
                   free: Tensor | None = None) -> Tensor:
        """Distillation: the loss of a student's raw output against a teacher's mixable quantity at
        x_t (squared error of the mixable quantities; generated entries only)."""
        return _free_mse(self.mixable(output, x_t, t, prediction), PathSample(x_t=x_t, target=teacher, free=free))

    def guide(self, unconditional: Tensor, conditional: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance of two mixable quantities (see the module docstring)."""
        return unconditional + scale * (conditional - unconditional)

    def check_prediction(self, prediction: Prediction) -> None:
        if Prediction(prediction) not in self.predictions:
            raise ValueError(
                f"{type(self).__name__} supports predictions {[p.value for p in self.predictions]}, "
                f"not {Prediction(prediction).value!r}"
            )


class GaussianPath(ProbabilityPath):
    """x_t = alpha_t x_0 + sigma_t eps with eps ~ N(0, I); mixes velocities."""

    predictions = (Prediction.VELOCITY, Prediction.EPSILON, Prediction.X0)

    def __init__(self, scheduler: Scheduler | None = None):
        self.scheduler = scheduler or LinearScheduler()

    def prior(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    def sample(self, x_0, t, generator, prediction, noise=None):
        eps = self.prior(x_0, generator) if noise is None else noise
        s = self.scheduler(_expand(t, x_0))
        target = {
            Prediction.VELOCITY: s.d_alpha * x_0 + s.d_sigma * eps,
            Prediction.EPSILON: eps,
            Prediction.X0: x_0,
        }[Prediction(prediction)]
        return PathSample(x_t=s.alpha * x_0 + s.sigma * eps, target=target)

    def loss(self, output, sample):
        return _free_mse(output, sample)

    def mixable(self, output, x_t, t, prediction):
        return convert(output, prediction, Prediction.VELOCITY, x_t, self.scheduler(_expand(t, x_t)))

    def step(self, x_t, mixed, t, t_next, generator, reveal=None):
        return x_t + _expand(t_next - t, x_t) * mixed


def wrap_centered(x: Tensor) -> Tensor:
    """Map displacements on the unit torus to their shortest representative in [-1/2, 1/2)."""
    return torch.remainder(x + 0.5, 1.0) - 0.5


class TorusPath(ProbabilityPath):
    """Geodesic path on [0, 1)^d: x_t = x_0 + t log_{x_0}(x_1) (mod 1), x_1 ~ U[0, 1)^d.

    The velocity log_{x_0}(x_1) = wrap(x_1 - x_0) is constant along the geodesic; sampling takes
    Euler steps on the torus and wraps back into [0, 1).
    """

    def prior(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    def sample(self, x_0, t, generator, prediction, noise=None):
        self.check_prediction(prediction)
        velocity = wrap_centered((self.prior(x_0, generator) if noise is None else noise) - x_0)
        return PathSample(x_t=torch.remainder(x_0 + _expand(t, x_0) * velocity, 1.0), target=velocity)

    def loss(self, output, sample):
        return _free_mse(output, sample)

    def mixable(self, output, x_t, t, prediction):
        return output

    def step(self, x_t, mixed, t, t_next, generator, reveal=None):
        return torch.remainder(x_t + _expand(t_next - t, x_t) * mixed, 1.0)


class MaskedPath(ProbabilityPath):
    """Absorbing discrete path over `num_categories` classes; index `num_categories` is the mask.

    The network outputs logits over the classes for x_0; the mixable quantity is the posterior
    p(x_0 | x_t). From t to t_next a masked entry is revealed with probability (t - t_next) / t,
    drawing its class from the posterior; revealed entries stay fixed.

    The same sampler as a deterministic function of noise drawn up front (`reveal_noise`): every
    entry has a reveal time tau ~ U(0, 1) and a uniform u; it is masked while t > tau, and revealed
    as the class where the posterior's CDF passes u. This is the same law, since an entry masked at
    t (tau < t) has tau >= t_next with probability (t - t_next) / t, and the inverse CDF at u is a
    draw from the posterior. It is the discrete counterpart of an ODE's noise x_1: the coupling a
    few-step student learns (`archipelago.experts.distill`).
    """

    predictions = (Prediction.X0,)
    stochastic_steps = True

    def __init__(self, num_categories: int):
        if num_categories < 2:
            raise ValueError(f"MaskedPath needs at least 2 categories, got {num_categories}")
        self.num_categories = num_categories

    @property
    def mask(self) -> int:
        return self.num_categories

    def prior(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.full(like.shape, self.mask, dtype=torch.long, device=like.device)

    def reveal_noise(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(tau, u) per entry, [..., 2]: reveal times and inverse-CDF draws (see the class docstring)."""
        return torch.rand((*like.shape, 2), generator=generator, device=like.device)

    def sample(self, x_0, t, generator, prediction, noise=None):
        # The prior is a point mass (every entry masked): the noise end of a pair is its reveal
        # noise, whose reveal times say which entries are masked at t.
        if noise is None:
            tau = torch.rand(x_0.shape, generator=generator, device=x_0.device)
        elif noise.is_floating_point() and noise.shape == (*x_0.shape, 2):
            tau = noise[..., 0]
        else:
            raise ValueError(f"a masked field's noise end is its reveal noise, float {(*x_0.shape, 2)}; got "
                             f"{noise.dtype} {tuple(noise.shape)}")
        masked = tau < _expand(t, x_0).to(tau.dtype)
        return PathSample(x_t=torch.where(masked, self.mask, x_0), target=x_0)

    def loss(self, output, sample):
        masked = sample.x_t == self.mask  # given entries are never masked, so never in the loss
        if not masked.any():
            return output.sum() * 0.0
        return F.cross_entropy(output[masked], sample.target[masked])

    def mixable(self, output, x_t, t, prediction):
        return output.softmax(dim=-1)

    def match_loss(self, output, teacher, x_t, t, prediction, free=None):
        """Cross-entropy of the student's posterior against the teacher's on the masked entries
        (the KL divergence up to the teacher's own entropy); revealed entries have no posterior."""
        masked = x_t == self.mask
        if not masked.any():
            return output.sum() * 0.0
        return -(teacher[masked] * output[masked].log_softmax(dim=-1)).sum(dim=-1).mean()

    def guide(self, unconditional: Tensor, conditional: Tensor, scale: float) -> Tensor:
        if scale == 1:
            return conditional
        log_p = (1 - scale) * unconditional.clamp_min(1e-30).log() + scale * conditional.clamp_min(1e-30).log()
        return log_p.softmax(dim=-1)

    def step(self, x_t, mixed, t, t_next, generator, reveal=None):
        flat = mixed.reshape(-1, self.num_categories).clamp_min(0)
        if reveal is not None:  # the coupled sampler: revealed when t_next <= tau, at the CDF's crossing of u
            now = (x_t == self.mask) & (reveal[..., 0] >= _expand(t_next, x_t).to(reveal.dtype))
            cdf = flat.cumsum(-1)
            below = cdf < reveal[..., 1].reshape(-1, 1).to(cdf.dtype) * cdf[:, -1:]
            drawn = below.sum(-1).clamp_max(self.num_categories - 1).reshape(x_t.shape)
            return torch.where(now, drawn, x_t)
        reveal_prob = ((t - t_next) / t.clamp_min(1e-12)).clamp(0.0, 1.0)
        u = torch.rand(x_t.shape, generator=generator, device=x_t.device)
        now = (x_t == self.mask) & (u < _expand(reveal_prob, x_t).to(u.dtype))
        drawn = torch.multinomial(flat, 1, generator=generator).reshape(x_t.shape)
        return torch.where(now, drawn, x_t)
