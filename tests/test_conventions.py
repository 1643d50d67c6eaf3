"""The time convention and prediction-type conversions: float64 round trips and analytic values."""

import itertools

import pytest
import torch

from archipelago.experts.conventions import LinearScheduler, Prediction, convert, decompose


@pytest.fixture
def point():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 5, generator=g, dtype=torch.float64)
    t = torch.rand(64, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    s = LinearScheduler()(t)
    return x0, eps, s, s.alpha * x0 + s.sigma * eps


def test_linear_schedule_is_data_at_zero_and_noise_at_one():
    s = LinearScheduler()(torch.tensor([0.0, 1.0]))
    assert s.alpha.tolist() == [1.0, 0.0] and s.sigma.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("source,target", list(itertools.permutations(Prediction, 2)))
def test_round_trip_is_exact_in_float64(point, source, target):
    x0, eps, s, x_t = point
    truth = {Prediction.X0: x0, Prediction.EPSILON: eps, Prediction.VELOCITY: eps - x0}
    there = convert(truth[source], source, target, x_t, s)
    torch.testing.assert_close(there, truth[target], rtol=0, atol=1e-12)
    back = convert(there, target, source, x_t, s)
    torch.testing.assert_close(back, truth[source], rtol=0, atol=1e-12)


def test_velocity_is_eps_minus_x0_and_recovers_both(point):
    x0, eps, s, x_t = point
    parts = decompose(eps - x0, Prediction.VELOCITY, x_t, s)
    torch.testing.assert_close(parts.x0, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(parts.eps, eps, rtol=0, atol=1e-12)
