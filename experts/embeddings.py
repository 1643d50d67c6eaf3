"""Embeddings of the diffusion time shared by the domains' networks.

`TimestepEmbedder`: sinusoidal features of t in [0, 1] (the transformer's positional encoding,
Vaswani et al. 2017, as DiT embeds diffusion steps) followed by an MLP.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t in [0, 1] followed by an MLP: t [B] -> c [B, D]."""

    def __init__(self, width: int, frequency_dim: int = 256, max_period: float = 10_000.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def sinusoid(self, t: Tensor) -> Tensor:
        # t is scaled to [0, 1000] so that the frequencies of the usual max_period span the range of t
        # (with t in [0, 1] most channels would barely move).
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)  # [H]
        args = 1000.0 * t.float()[:, None] * freqs[None]  # [B, H]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2H]

    def forward(self, t: Tensor) -> Tensor:
        if t.ndim != 1:
            raise ValueError(f"expected t of shape [B], got {list(t.shape)}")
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))  # [B, D]
