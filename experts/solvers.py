"""ODE solvers over the probability paths: pure functions of (model, x_1, time grid, generator).

`model(x_t, t)` maps a batch at per-sample times t [B] to the mixable quantity of every field
(the velocity for continuous fields, the posterior p(x_0 | x_t) for categorical ones). One
expert, a router-weighted ensemble and an analytic velocity all share this convention, so every
solver samples from any of them unchanged. The grid runs from t = 1 (noise) down to t = 0 (data).
A step from t to t_next moves each field along its own path (`ProbabilityPath.step`), so the
Runge-Kutta combinations below are taken on the mixable quantities and applied by the path
(on Euclidean fields that is the textbook method).

A coupled sampler (`draw_prior(..., coupled=True)`) carries the reveal noise of discrete fields in
x_1, so that it is a deterministic function of x_1 as an ODE is (see `MaskedPath`).

Given entries (`Given`: values fixed by the user, such as the atom types in structure prediction
or the known part of a window) are set in x_1 and never moved: every step puts them back, and
their masks travel in the batch under `given_key(field)` for the networks to read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from archipelago.experts.batch import Batch, Fields, FieldSpec, given_key, num_samples, per_row, reveal_key, with_fields
from archipelago.experts.paths import GaussianPath

Model = Callable[[Batch, Tensor], Mapping[str, Tensor]]
Solver = Callable[..., Batch]


def time_grid(steps: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """A uniform grid of `steps` steps from t = 1 to t = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=dtype, device=device)


@dataclass(frozen=True)
class Given:
    """Entries of one field fixed by the user: `values` laid out like the field, `mask` True where given."""

    values: Tensor
    mask: Tensor

    @classmethod
    def from_values(cls, values: Tensor) -> Given:
        """From values with NaN (floating fields) or a negative number (categorical fields) where free."""
        mask = ~values.isnan() if values.is_floating_point() else values >= 0
        return cls(values=torch.where(mask, values, torch.zeros_like(values)), mask=mask)


def impose(x: Batch, given: Mapping[str, Given] | None) -> Batch:
    """x with the given entries set to their values (and their masks in the batch)."""
    if not given:
        return x
    out = dict(x)
    for name, g in given.items():
        out[name] = torch.where(g.mask.to(x[name].device), g.values.to(x[name]), x[name])
        out[given_key(name)] = g.mask.to(x[name].device)
    return out


def _euclidean(x: Batch) -> dict[str, FieldSpec]:
    return {name: FieldSpec(GaussianPath()) for name in x}


def _advance(fields: Fields, x: Batch, mixed: Mapping[str, Tensor], t: Tensor, t_next: Tensor, generator,
             given: Mapping[str, Given] | None = None) -> Batch:
    """Move every field from t to t_next along its path; given entries stay where they are."""
    moved = {
        name: spec.path.step(x[name], mixed[name], per_row(t, x, spec), per_row(t_next, x, spec), generator,
                             reveal=x.get(reveal_key(name)))
        for name, spec in sorted(fields.items())
    }
    return impose(with_fields(x, fields, moved), given)


def _combine(weights: tuple[float, ...], quantities: tuple[Mapping[str, Tensor], ...]) -> dict[str, Tensor]:
    return {name: sum(w * q[name] for w, q in zip(weights, quantities, strict=True)) for name in quantities[0]}


def _steps(x_1: Batch, grid: Tensor, fields: Fields):
    """Yield (per-sample t, per-sample t_next, whether the step ends on the data) for every step.

    A step onto the data (t = 0) must not evaluate the model there: the velocity's target at t = 0
    is the noise itself, which no network can predict from clean data, so that evaluation adds its
    unpredictable part to the sample as high-frequency noise. Like EDM's sampler (Karras et al.
    2022, Algorithm 1), the higher-order solvers take that step as an Euler step (the denoised
    estimate x_t - t v(x_t, t) itself); RK4 as Heun's third-order method, which keeps its order.
    The flags come from the grid read once, not from a device sync per step.
    """
    b = num_samples(x_1, fields)
    onto_data = [t_next == 0 for t_next in grid[1:].tolist()]
    for t, t_next, last in zip(grid[:-1], grid[1:], onto_data, strict=True):
        yield t.expand(b).clone(), t_next.expand(b).clone(), last


def euler(model: Model, x_1: Batch, grid: Tensor, generator: torch.Generator | None = None,
          fields: Fields | None = None, given: Mapping[str, Given] | None = None) -> Batch:
    """Explicit Euler: one model call per step (first order)."""
    fields = fields or _euclidean(x_1)
    x = impose(x_1, given)
    for t, t_next, _ in _steps(x_1, grid, fields):
        x = _advance(fields, x, model(x, t), t, t_next, generator, given)
    return x


def heun(model: Model, x_1: Batch, grid: Tensor, generator: torch.Generator | None = None,
         fields: Fields | None = None, given: Mapping[str, Given] | None = None) -> Batch:
    """Heun's method (explicit trapezoid): two model calls per step (second order), one on the last."""
    fields = fields or _euclidean(x_1)
    x = impose(x_1, given)
    for t, t_next, onto_data in _steps(x_1, grid, fields):
        v_t = model(x, t)
        x_euler = _advance(fields, x, v_t, t, t_next, generator, given)
        if onto_data:
            x = x_euler
            continue
        v_next = model(x_euler, t_next)
        x = _advance(fields, x, _combine((0.5, 0.5), (v_t, v_next)), t, t_next, generator, given)
    return x


def rk4(model: Model, x_1: Batch, grid: Tensor, generator: torch.Generator | None = None,
        fields: Fields | None = None, given: Mapping[str, Given] | None = None) -> Batch:
    """The classical fourth-order Runge-Kutta method: four model calls per step; the last step, which
    must not evaluate at t = 0, is Heun's third-order method (three calls, fourth order kept overall)."""
    fields = fields or _euclidean(x_1)
    x = impose(x_1, given)
    for t, t_next, onto_data in _steps(x_1, grid, fields):
        t_mid = 0.5 * (t + t_next)
        k1 = model(x, t)
        if onto_data:  # Heun's third-order method: stages at 0, 1/3 and 2/3 of the step
            k2 = model(_advance(fields, x, k1, t, t + (t_next - t) / 3, generator, given), t + (t_next - t) / 3)
            t_two_thirds = t + 2 * (t_next - t) / 3
            k3 = model(_advance(fields, x, k2, t, t_two_thirds, generator, given), t_two_thirds)
            x = _advance(fields, x, _combine((0.25, 0.75), (k1, k3)), t, t_next, generator, given)
            continue
        k2 = model(_advance(fields, x, k1, t, t_mid, generator, given), t_mid)
        k3 = model(_advance(fields, x, k2, t, t_mid, generator, given), t_mid)
        k4 = model(_advance(fields, x, k3, t, t_next, generator, given), t_next)
        x = _advance(fields, x, _combine((1 / 6, 1 / 3, 1 / 3, 1 / 6), (k1, k2, k3, k4)), t, t_next, generator,
                     given)
    return x


# The solvers by name (feeds the SDK's and the command line's choices), with model calls per step.
SOLVERS: dict[str, Solver] = {"euler": euler, "heun": heun, "rk4": rk4}
CALLS_PER_STEP: dict[str, int] = {"euler": 1, "heun": 2, "rk4": 4}
CALLS_ON_LAST_STEP: dict[str, int] = {"euler": 1, "heun": 1, "rk4": 3}  # the step onto t = 0


def model_calls(solver: str, steps: int) -> int:
    """Model calls of `steps` steps of a named solver on a grid that ends at t = 0."""
    return (steps - 1) * CALLS_PER_STEP[solver] + CALLS_ON_LAST_STEP[solver]


def draw_prior(fields: Fields, template: Batch, generator: torch.Generator | None = None,
               coupled: bool = False) -> Batch:
    """x_1: every field drawn from its path's prior, shaped like `template` (other tensors kept).
    `coupled`: also the reveal noise of paths whose steps draw (under `reveal_key(field)`), which
    makes the whole sampler a deterministic function of x_1."""
    x_1 = dict(template)
    for name, spec in sorted(fields.items()):
        x_1[name] = spec.path.prior(template[name], generator)
    for name, spec in sorted(fields.items()) if coupled else ():
        reveal = spec.path.reveal_noise(template[name], generator)
        if reveal is not None:
            x_1[reveal_key(name)] = reveal
    return x_1


def integrate(model: Model, x_1: Batch, fields: Fields, solver: str = "heun", steps: int = 50,
              generator: torch.Generator | None = None, progress: bool = False,
              given: Mapping[str, Given] | None = None) -> Batch:
    """Integrate from x_1 at t = 1 to t = 0 with a named solver on a uniform grid, given entries fixed."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    floats = [x_1[name] for name in sorted(fields) if x_1[name].is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    grid = time_grid(steps, dtype=dtype, device=x_1[sorted(fields)[0]].device)
    with torch.no_grad(), tqdm(total=model_calls(solver, steps), desc=f"sampling ({solver})",
                               disable=not progress, leave=False) as bar:

        def counted(x: Batch, t: Tensor) -> Mapping[str, Tensor]:
            bar.update(1)
            return model(x, t)

        return SOLVERS[solver](counted, x_1, grid, generator=generator, fields=fields, given=given)
