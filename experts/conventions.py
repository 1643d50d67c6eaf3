"""The time convention and the prediction types of continuous fields, with their conversions.

Time runs over t in [0, 1]; t = 0 is data and t = 1 is noise (as in Decentralized Diffusion Models
and diffusers' flow-matching scheduler). An affine Gaussian path writes

    x_t = alpha_t x_0 + sigma_t eps,        v_t = d_alpha_t x_0 + d_sigma_t eps,

and the default linear (rectified-flow) schedule has alpha_t = 1 - t, sigma_t = t, so the velocity
target is v = eps - x_0 and sampling integrates dx/dt = v from t = 1 down to t = 0.

A network may predict the velocity v, the noise eps or the clean sample x_0. Given x_t, the three
are linear in one another; `convert` maps any one to any other. Every conversion solves the same
2x2 system for (x_0, eps), so the round trips are exact up to floating point.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum

from torch import Tensor


class Prediction(StrEnum):
    """What a network outputs for a continuous field."""

    VELOCITY = "velocity"  # v = d_alpha x_0 + d_sigma eps (eps - x_0 on the linear schedule)
    EPSILON = "epsilon"  # the noise eps
    X0 = "x0"  # the clean sample x_0


@dataclass(frozen=True)
class ScheduleValues:
    """alpha_t, sigma_t and their time derivatives, broadcastable against x_t."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor


class Scheduler(ABC):
    """Maps t to the coefficients of an affine Gaussian path."""

    @abstractmethod
    def __call__(self, t: Tensor) -> ScheduleValues: ...


class LinearScheduler(Scheduler):
    """alpha_t = 1 - t, sigma_t = t: the flow-matching / rectified-flow schedule."""

    def __call__(self, t: Tensor) -> ScheduleValues:
        return ScheduleValues(alpha=1 - t, sigma=t, d_alpha=-1 + 0 * t, d_sigma=1 + 0 * t)


@dataclass(frozen=True)
class CleanAndNoise:
    """The (x_0, eps) pair that a prediction implies at x_t."""

    x0: Tensor
    eps: Tensor


def decompose(pred: Tensor, kind: Prediction, x_t: Tensor, s: ScheduleValues) -> CleanAndNoise:
    """Solve x_t = alpha x_0 + sigma eps together with the prediction for (x_0, eps)."""
    kind = Prediction(kind)
    if kind is Prediction.X0:
        return CleanAndNoise(x0=pred, eps=(x_t - s.alpha * pred) / s.sigma)
    if kind is Prediction.EPSILON:
        return CleanAndNoise(x0=(x_t - s.sigma * pred) / s.alpha, eps=pred)
    det = s.alpha * s.d_sigma - s.sigma * s.d_alpha  # 1 on the linear schedule
    return CleanAndNoise(
        x0=(s.d_sigma * x_t - s.sigma * pred) / det,
        eps=(s.alpha * pred - s.d_alpha * x_t) / det,
    )


def compose(parts: CleanAndNoise, kind: Prediction, s: ScheduleValues) -> Tensor:
    """The prediction of the given kind that corresponds to (x_0, eps)."""
    kind = Prediction(kind)
    if kind is Prediction.X0:
        return parts.x0
    if kind is Prediction.EPSILON:
        return parts.eps
    return s.d_alpha * parts.x0 + s.d_sigma * parts.eps


def convert(pred: Tensor, source: Prediction, target: Prediction, x_t: Tensor, s: ScheduleValues) -> Tensor:
    """Convert a prediction of kind `source` at x_t into the equivalent prediction of kind `target`."""
    if Prediction(source) is Prediction(target):
        return pred
    return compose(decompose(pred, source, x_t, s), target, s)
