"""The Gaussian path of windows with Diffusion-TS's Fourier-domain loss term.

Diffusion-TS (Yuan & Qiao, ICLR 2024) adds to its denoising loss the error of the prediction in the
frequency domain: the FFT along time of predicted and true windows, compared on their real and
imaginary parts. `FourierGaussianPath` adds that term, weighted by `fourier_weight`, to the
flow-matching loss:

    loss = mean (out - target)^2 + w * mean |Re F(out - target)| + |Im F(out - target)|

with F the real FFT along the window's time axis (norm "forward", as Diffusion-TS), on the
generated entries only. With x_0 prediction this is Diffusion-TS's term on x_0; with velocity or
epsilon prediction it is the same term on the predicted quantity.

The term is an L1 on purpose. A squared error in the frequency domain adds nothing: by Parseval,
sum |F r|^2 is a constant times sum r^2, so it would only rescale the MSE already there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from archipelago.experts.paths import GaussianPath, PathSample

TIME_AXIS = 1  # windows are [B, L, C]


def fourier_l1(residual: Tensor) -> Tensor:
    """Mean absolute real and imaginary parts of the residual's real FFT along time."""
    spectrum = torch.fft.rfft(residual, dim=TIME_AXIS, norm="forward")
    return spectrum.real.abs().mean() + spectrum.imag.abs().mean()


class FourierGaussianPath(GaussianPath):
    """`GaussianPath` whose loss adds the Fourier-domain L1 term of Diffusion-TS."""

    def __init__(self, fourier_weight: float):
        super().__init__()
        if fourier_weight < 0:
            raise ValueError(f"fourier_weight must be >= 0, got {fourier_weight}")
        self.fourier_weight = fourier_weight

    def loss(self, output: Tensor, sample: PathSample) -> Tensor:
        residual = output - sample.target
        if sample.free is not None:  # given entries are not the network's to predict
            residual = residual * sample.free.expand_as(residual)
        return super().loss(output, sample) + self.fourier_weight * fourier_l1(residual)
