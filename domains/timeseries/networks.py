"""Networks of the time-series domain: a DiT-style denoiser over time steps and the router backbone.

Tokens are the L time steps of a window [B, L, C]: Linear(C -> D) plus a learned positional
embedding. The diffusion time t in [0, 1] is embedded sinusoidally, passed through an MLP, and
conditions every block through adaLN-Zero (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"): each block regresses shift, scale and gate from t, with the regression zero-initialised
so that every block starts as the identity. The denoiser's final layer is zero-initialised too, so
an untrained denoiser outputs zeros. No dropout: training is bit-reproducible.

The router (DDM, McAllister et al. 2025) reuses the same embedding and blocks with a learned CLS
token, and reads logits of p(k | x_t, t) from the CLS output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archipelago.experts.embeddings import TimestepEmbedder


@dataclass(frozen=True)
class DenoiserConfig:
    channels: int  # C, channels of the series
    length: int  # L, time steps per window (one token each)
    width: int = 64  # D, token width
    depth: int = 3  # number of adaLN-Zero transformer blocks
    heads: int = 4  # attention heads; must divide width
    mlp_ratio: float = 4.0  # hidden width of each block's MLP, as a multiple of width

    def __post_init__(self) -> None:
        _check_shape(self.channels, self.length, self.width, self.depth, self.heads)


@dataclass(frozen=True)
class RouterConfig:
    channels: int  # C, channels of the series
    length: int  # L, time steps per window (one token each)
    num_experts: int  # K, one logit per expert
    width: int = 48  # D, token width
    depth: int = 2  # number of adaLN-Zero transformer blocks
    heads: int = 4  # attention heads; must divide width

    def __post_init__(self) -> None:
        _check_shape(self.channels, self.length, self.width, self.depth, self.heads)
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")


def _check_shape(channels: int, length: int, width: int, depth: int, heads: int) -> None:
    if min(channels, length, width, depth, heads) < 1:
        raise ValueError("channels, length, width, depth and heads must all be >= 1")
    if width % heads:
        raise ValueError(f"heads ({heads}) must divide width ({width})")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with per-sample shift and scale broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TokenEmbedder(nn.Module):
    """Time steps as tokens: Linear(C -> D) plus a learned positional embedding over L."""

    def __init__(self, channels: int, length: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, width)
        self.pos = nn.Parameter(torch.zeros(1, length, width))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1:] != self.pos.shape[1:2] + (self.proj.in_features,):
            raise ValueError(
                f"expected x of shape [B, {self.pos.shape[1]}, {self.proj.in_features}], got {list(x.shape)}"
            )
        return self.proj(x) + self.pos  # [B, L, D]


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask: a window is seen whole)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)  # [B, N, 3, h, D/h]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, h, N, D/h]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, D/h]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, N, D]


class AdaLNBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning: (x [B, N, D], c [B, D]) -> [B, N, D]."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # adaLN-Zero: gates start at 0
        zero_init(self.ada[-1])

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # each [B, D]
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))  # [B, N, D]
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))  # [B, N, D]


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map back to channels: [B, L, D] -> [B, L, C]."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, channels)
        zero_init(self.ada[-1])

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)  # each [B, D]
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, L, C]


class TimeSeriesDenoiser(nn.Module):
    """The expert network: (x_t {"x": [B, L, C]}, t [B]) -> {"x": [B, L, C]} (the model's prediction)."""

    def __init__(self, config: DenoiserConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = TokenEmbedder(config.channels, config.length, config.width)
        self.t_embedder = TimestepEmbedder(config.width)
        self.blocks = nn.ModuleList(
            AdaLNBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final = FinalLayer(config.width, config.channels)
        init_weights(self, generator)
        zero_init(self.final.linear)

    def forward(self, x_t: dict[str, Tensor], t: Tensor) -> dict[str, Tensor]:
        h = self.embed(x_t["x"])  # [B, L, D]
        c = self.t_embedder(t)  # [B, D]
        for block in self.blocks:
            h = block(h, c)  # [B, L, D]
        return {"x": self.final(h, c)}  # [B, L, C]


class TimeSeriesRouterNet(nn.Module):
    """The router backbone: (x_t {"x": [B, L, C]}, t [B]) -> logits of p(k | x_t, t) [B, K]."""

    def __init__(self, config: RouterConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = TokenEmbedder(config.channels, config.length, config.width)
        self.t_embedder = TimestepEmbedder(config.width)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.width))
        self.blocks = nn.ModuleList(AdaLNBlock(config.width, config.heads) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.num_experts)
        init_weights(self, generator)
        nn.init.normal_(self.cls, std=0.02, generator=generator)
        # A zero head starts the router at the uniform p(k | x_t, t) = 1 / K (cross-entropy log K).
        zero_init(self.head)

    def forward(self, x_t: dict[str, Tensor], t: Tensor) -> Tensor:
        tokens = self.embed(x_t["x"])  # [B, L, D]
        c = self.t_embedder(t)  # [B, D]
        h = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1)  # [B, 1 + L, D]
        for block in self.blocks:
            h = block(h, c)  # [B, 1 + L, D]
        return self.head(self.norm(h[:, 0]))  # [B, K]


def zero_init(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


def init_weights(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """DiT's initialisation, drawn from `generator` when given (so weights do not depend on global state).

    Linear layers: Xavier-uniform weights, zero biases; the time MLP and the learned tokens: N(0, 0.02);
    every adaLN regression: zero, which makes each block (and the final modulation) start as the identity.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight, generator=generator)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, TimestepEmbedder):
            for layer in (module.mlp[0], module.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02, generator=generator)
        elif isinstance(module, TokenEmbedder):
            nn.init.normal_(module.pos, std=0.02, generator=generator)
        elif isinstance(module, (AdaLNBlock, FinalLayer)):
            zero_init(module.ada[-1])  # again, after the Xavier pass above
