"""Solvers against flows with closed forms."""

import pytest
import torch

from archipelago.experts.batch import FieldSpec
from archipelago.experts.paths import TorusPath
from archipelago.experts.solvers import SOLVERS, model_calls, time_grid

# dx/dt = 3 t^2 integrates from t = 1 to t = 0 to x(0) = x(1) - 1.
ORDER = {"euler": 1, "heun": 2, "rk4": 4}
TOLERANCE = {"euler": 1e-2, "heun": 2e-5, "rk4": 1e-12}  # at 200 steps; RK4 is exact on quadratics


def cubic(x, t):
    return {"x": 3 * t[:, None] ** 2 * torch.ones_like(x["x"])}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_integrates_3t2(name):
    x_1 = {"x": torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    out = SOLVERS[name](cubic, x_1, time_grid(200, dtype=torch.float64))
    torch.testing.assert_close(out["x"], x_1["x"] - 1, rtol=0, atol=TOLERANCE[name])


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_convergence_order_on_linear_ode(name):
    """dx/dt = x has x(0) = x(1) / e; halving the step divides the error by about 2^order."""
    x_1 = {"x": torch.ones(1, 1, dtype=torch.float64)}

    def error(steps):
        out = SOLVERS[name](lambda x, t: {"x": x["x"]}, x_1, time_grid(steps, dtype=torch.float64))
        return (out["x"] - torch.exp(torch.tensor(-1.0, dtype=torch.float64))).abs().item()

    ratio = error(16) / error(32)
    assert 2 ** ORDER[name] * 0.8 < ratio < 2 ** ORDER[name] * 1.25


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_calls_per_step(name):
    calls = []

    def counting(x, t):
        calls.append(1)
        return {"x": torch.zeros_like(x["x"])}

    SOLVERS[name](counting, {"x": torch.zeros(2, 1)}, time_grid(5))
    assert len(calls) == model_calls(name, 5) == {"euler": 5, "heun": 9, "rk4": 19}[name]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_no_solver_evaluates_the_model_on_the_data(name):
    """At t = 0 the velocity's target is pure noise; evaluating there puts it in the sample."""
    seen = []

    def recording(x, t):
        seen.append(t.min().item())
        return {"x": torch.zeros_like(x["x"])}

    SOLVERS[name](recording, {"x": torch.zeros(2, 1)}, time_grid(4))
    assert min(seen) > 0


def test_torus_steps_stay_on_the_torus():
    fields = {"x": FieldSpec(TorusPath())}
    x_1 = {"x": torch.full((3, 2), 0.9)}
    out = SOLVERS["euler"](lambda x, t: {"x": torch.full_like(x["x"], -0.35)}, x_1, time_grid(4), fields=fields)
    torch.testing.assert_close(out["x"], torch.full((3, 2), 0.25))  # 0.9 + 0.35 wraps to 0.25


def test_time_grid_runs_from_noise_to_data():
    grid = time_grid(4)
    assert grid[0] == 1 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)
