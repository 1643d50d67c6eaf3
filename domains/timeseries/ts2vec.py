"""A TS2Vec-style window encoder and its hierarchical contrastive training.

TS2Vec (Yue et al., "TS2Vec: Towards Universal Representation of Time Series", AAAI 2022): an input
projection, a binomial timestamp mask, dilated residual 1-D convolutions, and a contrastive loss over
two overlapping random crops, applied at every scale of a max-pooling pyramid, both across windows
(instance-wise) and across time steps (temporal). Context-FID (Jeha et al., ICLR 2022; as computed
by Diffusion-TS, Yuan & Qiao, ICLR 2024) trains it afresh on the real windows for 600 iterations of
batch 8 and embeds each window as the time-wise max of its 320-d representation. Every random draw
(initial weights, batches, crops, masks, dropout) comes from one explicit torch.Generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel


@torch.no_grad()
def seeded(build: Callable[[], nn.Module], generator: torch.Generator, device: str | torch.device) -> nn.Module:
    """Build a module on `device` with PyTorch's default initialisation drawn from `generator`.

    Every Linear/Conv1d/GRU parameter is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)): for Linear and
    Conv1d this is their own `reset_parameters` (kaiming_uniform with a = sqrt(5)); for GRU fan_in is
    the hidden size, as in `nn.GRU.reset_parameters`. The module is built on the meta device first, so
    the global random state is never touched.
    """
    with torch.device("meta"):
        module = build()
    module.to_empty(device=device)
    for layer in module.modules():
        params = list(layer.parameters(recurse=False))
        if not params:
            continue
        if isinstance(layer, nn.GRU):
            fan_in = layer.hidden_size
        elif isinstance(layer, (nn.Linear, nn.Conv1d)):
            fan_in = layer.weight[0].numel()
        else:
            raise TypeError(f"seeded() cannot initialise {type(layer).__name__}")
        bound = 1.0 / math.sqrt(fan_in)
        for p in params:
            p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
    return module


class DilatedBlock(nn.Module):
    """GELU, conv, GELU, conv (kernel 3, 'same' padding) plus a residual, 1x1-projected when needed."""

    def __init__(self, channels_in: int, channels_out: int, dilation: int, project: bool):
        super().__init__()
        self.conv1 = nn.Conv1d(channels_in, channels_out, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv1d(channels_out, channels_out, 3, padding=dilation, dilation=dilation)
        self.skip = nn.Conv1d(channels_in, channels_out, 1) if project else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: [B, channels_in, L]
        out = _conv(self.conv2, F.gelu(_conv(self.conv1, F.gelu(h))))
        return out + self.skip(h)  # [B, channels_out, L]


def _conv(conv: nn.Conv1d, h: torch.Tensor) -> torch.Tensor:
    """conv(h) for a kernel-3 'same' conv; once the dilation reaches the window length the outer taps
    read only zero padding, so only the centre tap is applied (same result, a third of the work)."""
    if conv.dilation[0] >= h.shape[-1]:
        return F.conv1d(h, conv.weight[:, :, 1:2], conv.bias)
    return conv(h)


class TS2VecEncoder(nn.Module):
    """Per-time-step representations of a window: [B, L, C] -> [B, L, output_dims]."""

    def __init__(self, channels: int, hidden_dims: int = 64, depth: int = 10, output_dims: int = 320):
        super().__init__()
        self.input_fc = nn.Linear(channels, hidden_dims)
        widths = [hidden_dims] * depth + [output_dims]
        # Dilation doubles per block; the last block (to output_dims) always has a projected residual.
        self.blocks = nn.Sequential(
            *(DilatedBlock(hidden_dims, width, 2**i, project=i == depth) for i, width in enumerate(widths))
        )
        self.mask_p = 0.5  # probability that a time step is kept (binomial timestamp masking)
        self.dropout_p = 0.1  # dropout on the output representation

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Encode x [B, L, C]; in training mode the mask and dropout are drawn from `generator`."""
        h = self.input_fc(x)  # [B, L, hidden]
        if self.training:
            keep = torch.rand(h.shape[:2], generator=generator) < self.mask_p  # [B, L]
            h = h * keep.to(h.device).unsqueeze(-1)
        z = self.blocks(h.transpose(1, 2)).transpose(1, 2)  # [B, L, output_dims]
        if self.training:
            keep = torch.rand(z.shape, generator=generator) >= self.dropout_p
            z = z * keep.to(z.device) / (1 - self.dropout_p)
        return z


def _contrast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """InfoNCE within each group: item i of `a` is positive with item i of `b`, negative with all else.

    a, b: [G, n, D]. Each of the 2n items is scored against the other 2n - 1 by dot product.
    """
    n = a.shape[1]
    if n == 1:
        return a.new_zeros(())
    z = torch.cat([a, b], dim=1)  # [G, 2n, D]
    sim = z @ z.transpose(1, 2)  # [G, 2n, 2n]
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    log_p = F.log_softmax(sim.masked_fill(eye, float("-inf")), dim=-1)
    i = torch.arange(n, device=z.device)
    return -(log_p[:, i, n + i].mean() + log_p[:, n + i, i].mean()) / 2


def hierarchical_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """TS2Vec's loss on two views [B, T, D] of the same time steps, averaged over a max-pool pyramid."""
    loss, levels = z1.new_zeros(()), 0
    while z1.shape[1] > 1:
        instance = _contrast(z1.transpose(0, 1), z2.transpose(0, 1))  # windows contrasted per time step
        temporal = _contrast(z1, z2)  # time steps contrasted per window
        loss = loss + alpha * instance + (1 - alpha) * temporal
        levels += 1
        z1 = F.max_pool1d(z1.transpose(1, 2), kernel_size=2).transpose(1, 2)
        z2 = F.max_pool1d(z2.transpose(1, 2), kernel_size=2).transpose(1, 2)
    if z1.shape[1] == 1:
        loss = loss + alpha * _contrast(z1.transpose(0, 1), z2.transpose(0, 1))
        levels += 1
    return loss / levels


def _randint(low: int, high: int, generator: torch.Generator, size: tuple[int, ...] = ()) -> torch.Tensor:
    """Integers uniform in [low, high], both ends included."""
    return torch.randint(low, high + 1, size, generator=generator)


def random_crops(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two overlapping crops of each window in x [B, L, C], as TS2Vec draws them.

    A shared segment [left, right) of length `overlap` is chosen; view 1 extends it to the left (to
    `outer_left`), view 2 to the right (to `outer_right`); each window is then shifted by its own
    random offset that keeps both views inside it. Returns (view1, view2, overlap); the overlap is the
    last `overlap` steps of view 1 and the first `overlap` steps of view 2.
    """
    batch, length = x.shape[:2]
    overlap = int(_randint(2, length, generator))
    left = int(_randint(0, length - overlap, generator))
    right = left + overlap
    outer_left = int(_randint(0, left, generator))
    outer_right = int(_randint(right, length, generator))
    shift = _randint(-outer_left, length - outer_right, generator, (batch,)).to(x.device)  # [B]
    rows = torch.arange(batch, device=x.device)[:, None]
    steps1 = shift[:, None] + torch.arange(outer_left, right, device=x.device)  # [B, right - outer_left]
    steps2 = shift[:, None] + torch.arange(left, outer_right, device=x.device)  # [B, outer_right - left]
    return x[rows, steps1], x[rows, steps2], overlap


def train_ts2vec(
    data: torch.Tensor,
    generator: torch.Generator,
    *,
    iterations: int = 600,
    batch_size: int = 8,
    lr: float = 1e-3,
) -> nn.Module:
    """Train an encoder on windows data [N, L, C] (on data's device); return the weight average.

    As TS2Vec: AdamW, shuffled batches without replacement (the last partial batch dropped), and the
    returned encoder is the running average of the weights over all iterates (stochastic weight
    averaging), in eval mode.
    """
    n, length, channels = data.shape
    if length < 2:
        raise ValueError(f"TS2Vec needs windows of at least 2 steps, got {length}")
    batch_size = min(batch_size, n)
    encoder = seeded(lambda: TS2VecEncoder(channels), generator, data.device)
    average = AveragedModel(encoder)
    average.update_parameters(encoder)  # the initial weights count as the first iterate, as in TS2Vec
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr)
    order, cursor = torch.randperm(n, generator=generator), 0
    for _ in range(iterations):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        x = data[order[cursor : cursor + batch_size].to(data.device)]  # [b, L, C]
        cursor += batch_size
        view1, view2, overlap = random_crops(x, generator)
        z1 = encoder(view1, generator)[:, -overlap:]  # [b, overlap, D]
        z2 = encoder(view2, generator)[:, :overlap]  # [b, overlap, D]
        loss = hierarchical_contrastive_loss(z1, z2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        average.update_parameters(encoder)
    return average.module.eval()


@torch.no_grad()
def embed(encoder: nn.Module, data: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Window embeddings [N, D]: the encoder's representation max-pooled over time."""
    return torch.cat([encoder(x).amax(dim=1) for x in data.split(batch_size)])
