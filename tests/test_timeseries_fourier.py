"""Tests of Diffusion-TS's Fourier-domain loss term on the time-series path."""

import pytest
import torch
from pydantic import ValidationError

from archipelago.domains.timeseries.domain import TimeSeriesDomain
from archipelago.domains.timeseries.paths import FourierGaussianPath, fourier_l1
from archipelago.experts.conventions import Prediction
from archipelago.experts.paths import GaussianPath, PathSample


def residual_sample(seed: int = 0) -> tuple[torch.Tensor, PathSample]:
    generator = torch.Generator().manual_seed(seed)
    x_0 = torch.rand(8, 24, 3, generator=generator)
    sample = GaussianPath().sample(x_0, torch.rand(8, generator=generator), generator, Prediction.X0)
    output = sample.target + 0.1 * torch.randn(sample.target.shape, generator=generator)
    return output, sample


def test_the_term_tells_apart_residuals_of_equal_mse():
    # An L2 in frequency could not (Parseval: paths.py); the L1 is smaller for a spectrum concentrated
    # in one frequency than for white noise of the same energy.
    time = torch.arange(24, dtype=torch.float32)
    smooth = torch.cos(2 * torch.pi * time / 24).reshape(1, 24, 1)
    noise = torch.randn(1, 24, 1, generator=torch.Generator().manual_seed(0))
    noise = noise * smooth.norm() / noise.norm()
    assert torch.isclose(smooth.pow(2).mean(), noise.pow(2).mean())
    assert fourier_l1(smooth) < 0.5 * fourier_l1(noise)


def test_the_term_is_added_to_the_mse_and_vanishes_at_the_target():
    output, sample = residual_sample()
    plain, spectral = GaussianPath().loss(output, sample), FourierGaussianPath(0.5).loss(output, sample)
    assert spectral == pytest.approx(float(plain + 0.5 * fourier_l1(output - sample.target)))
    assert float(FourierGaussianPath(0.5).loss(sample.target, sample)) == 0.0


def test_given_entries_add_nothing_to_the_term():
    output, sample = residual_sample()
    free = torch.ones_like(sample.target, dtype=torch.bool)
    free[:, :12] = False  # the first half of every window is given (forecasting)
    masked = PathSample(x_t=sample.x_t, target=sample.target, free=free)
    changed = output.clone()
    changed[:, :12] += 5.0
    path = FourierGaussianPath(1.0)
    assert float(path.loss(changed, masked)) == pytest.approx(float(path.loss(output, masked)))


def test_the_domain_uses_the_term_only_when_weighted_and_refuses_a_negative_weight():
    assert type(TimeSeriesDomain().fields["x"].path) is GaussianPath
    path = TimeSeriesDomain(fourier_weight=0.8).fields["x"].path
    assert isinstance(path, FourierGaussianPath) and path.fourier_weight == 0.8
    assert TimeSeriesDomain.from_config(TimeSeriesDomain(fourier_weight=0.8).to_config()).config.fourier_weight == 0.8
    with pytest.raises(ValidationError, match="fourier_weight"):
        TimeSeriesDomain(fourier_weight=-1)
