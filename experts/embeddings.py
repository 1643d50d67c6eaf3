"""Embeddings of the diffusion time and of the conditions, shared by the domains' networks.

`TimestepEmbedder`: sinusoidal features of t in [0, 1] (the transformer's positional encoding,
Vaswani et al. 2017, as DiT embeds diffusion steps) followed by an MLP.
`ConditionEmbedding`: per-sample conditions (classes, properties, null included) as one vector.
`RevealEmbedding`: a masked entry's reveal noise (tau, u), the input of a few-step student of a
discrete field (see `MaskedPath` and `archipelago.experts.distill`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from archipelago.experts.batch import reveal_key
from archipelago.experts.conditions import Condition


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


class ConditionEmbedding(nn.Module):
    """Per-sample conditions as one vector [B, D]: a class embedding (null included) per categorical
    condition, a linear map of (value, present) per continuous one."""

    def __init__(self, conditions: tuple[Condition, ...], width: int):
        super().__init__()
        self.conditions, self.width = conditions, width
        self.maps = nn.ModuleList(nn.Embedding(len(c.classes) + 1, width) if c.categorical else nn.Linear(2, width)
                                  for c in conditions)

    def forward(self, x_t: dict[str, Tensor], b: int, device: torch.device) -> Tensor:
        out = torch.zeros(b, self.width, device=device)
        for condition, embed in zip(self.conditions, self.maps, strict=True):
            value = x_t[condition.name]
            if condition.categorical:
                out = out + embed(value.long())
            else:
                value = value.float()
                out = out + embed(torch.stack([value.nan_to_num(0.0), (~value.isnan()).float()], -1))
        return out


class RevealEmbedding(nn.Module):
    """Per entry of a discrete field, its reveal noise (tau, u) as a vector [R, D] while the entry
    is masked, zero once revealed or when the batch carries no reveal noise (the sampler is not
    coupled). Fourier features of both, since the student must place u against the posterior's CDF
    finely. The last layer starts at zero, so a student built on another's weights starts as it."""

    def __init__(self, width: int, frequencies: int = 8):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(2 + 4 * frequencies, width), nn.SiLU(), nn.Linear(width, width))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x_t: dict[str, Tensor], name: str, mask_token: int) -> Tensor | None:
        """The embedding of field `name`'s masked entries [..., D], or None without reveal noise."""
        noise = x_t.get(reveal_key(name))
        if noise is None:
            return None
        k = torch.arange(1, self.frequencies + 1, device=noise.device, dtype=noise.dtype)
        angle = 2 * math.pi * noise[..., None] * k  # [..., 2, F]
        features = torch.cat([noise, angle.sin().flatten(-2), angle.cos().flatten(-2)], -1)
        masked = (x_t[name] == mask_token)[..., None]
        return self.mlp(features.to(self.mlp[0].weight.dtype)) * masked
