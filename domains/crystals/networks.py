"""Networks of the crystal domain: a CSPNet-style periodic message-passing denoiser and its pooled router.

The denoiser follows CSPNet of DiffCSP (Jiao et al. 2023, "Crystal Structure Prediction by Joint
Equivariant Diffusion", Sec. 4.2): every atom of a cell exchanges a message with every other atom of
the same cell, built from both atoms' states, the lattice, and Fourier features of their fractional
coordinate difference f_j - f_i. Those features are periodic (a shift of an atom by a lattice vector
changes nothing), and a difference does not see a common translation, so the network is invariant
to periodic translation and, with mean aggregation over all pairs, equivariant to permutations of
the atoms.

The lattice reaches the messages as the 6 standardized entries of log S, the rotation-invariant
lattice representation of the domain (see `lattice.py`); S S^T is the matrix of lattice inner
products L L^T that CSPNet feeds, so the two carry the same information.

Outputs: per atom, the torus velocity of its fractional coordinates (3) and logits over the element
vocabulary; per crystal, the velocity of the 6 lattice entries from the mean of the atom states.
The router backbone is the same network, smaller, with K logits from the pooled atom states.

Atoms are a ragged level (`atom_batch` maps each row to its crystal); the pairs are built per batch
from it, i != j, with no padding. Plain torch: torch-scatter has no wheels here, and `index_add_`
does the one aggregation needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archipelago.experts.conditions import Condition
from archipelago.experts.embeddings import ConditionEmbedding, RevealEmbedding, TimestepEmbedder

LATTICE_DIM = 6  # the upper triangle of log S


@dataclass(frozen=True)
class CrystalNetConfig:
    elements: int  # size of the element vocabulary (the mask token is one more)
    conditions: tuple[Condition, ...] = ()  # per-crystal conditions, sorted by name
    width: int = 128  # atom channels
    depth: int = 4  # message-passing layers
    frequencies: int = 16  # Fourier frequencies per fractional coordinate
    outputs: int | None = None  # None: a denoiser; K: a router with K logits
    reveal_noise: bool = False  # the denoiser reads masked atom types' reveal noise (a few-step student)

    def __post_init__(self) -> None:
        if min(self.elements, self.width, self.depth, self.frequencies) < 1:
            raise ValueError("elements, width, depth and frequencies must all be >= 1")


def cell_pairs(atom_batch: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """All ordered pairs (i, j), i != j, of atoms in the same crystal: two index tensors [P]. A
    crystal's rows are contiguous, as every ragged level of a batch is."""
    counts = torch.bincount(atom_batch, minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    per_atom = counts[atom_batch]  # every atom i meets each atom of its crystal (itself dropped below)
    i = torch.repeat_interleave(torch.arange(len(atom_batch), device=atom_batch.device), per_atom)
    first = torch.cumsum(per_atom, 0) - per_atom
    offset = torch.arange(len(i), device=i.device) - torch.repeat_interleave(first, per_atom)
    j = starts[atom_batch[i]] + offset
    keep = i != j
    return i[keep], j[keep]


def fourier(difference: Tensor, frequencies: int) -> Tensor:
    """sin and cos of 2 pi k d for k = 1..frequencies, per coordinate: [P, 3] -> [P, 6 * frequencies]."""
    k = torch.arange(1, frequencies + 1, device=difference.device, dtype=difference.dtype)
    angle = 2 * math.pi * difference[..., None] * k  # [P, 3, F]
    return torch.cat([angle.sin(), angle.cos()], -1).flatten(1)


def _mlp(inputs: int, outputs: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.SiLU(), nn.Linear(width, outputs))


class CSPLayer(nn.Module):
    """One message-passing layer: m_ij = phi_m(h_i, h_j, lattice, Fourier(f_j - f_i)), then
    h_i += phi_h(h_i, mean_j m_ij), with a layer norm on the input as CSPNet has."""

    def __init__(self, width: int, frequencies: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.message = nn.Sequential(nn.Linear(2 * width + LATTICE_DIM + 6 * frequencies, width), nn.SiLU(),
                                     nn.Linear(width, width), nn.SiLU())
        self.update = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())

    def forward(self, h: Tensor, pairs: tuple[Tensor, Tensor], lattice: Tensor, periodic: Tensor,
                neighbours: Tensor) -> Tensor:
        i, j = pairs
        x = self.norm(h)
        m = self.message(torch.cat([x[i], x[j], lattice, periodic], -1))
        aggregated = torch.zeros_like(x).index_add_(0, i, m) / neighbours
        return h + self.update(torch.cat([x, aggregated], -1))


def mean_per_crystal(values: Tensor, atom_batch: Tensor, b: int) -> Tensor:
    """Mean over each crystal's atoms: [R, C] -> [B, C]."""
    total = torch.zeros(b, values.shape[1], device=values.device, dtype=values.dtype).index_add_(0, atom_batch, values)
    return total / torch.bincount(atom_batch, minlength=b).clamp_min(1)[:, None].to(values.dtype)


class CSPNet(nn.Module):
    """The denoiser ({"frac_coords": [R, 3], "atom_type": [R, E], "lattice": [B, 6]}) or, with
    `outputs`, the router (logits [B, K] of p(k | x_t, t))."""

    def __init__(self, config: CrystalNetConfig):
        super().__init__()
        c = self.config = config
        self.embed_type = nn.Embedding(c.elements + 1, c.width)  # + the mask token
        self.time = TimestepEmbedder(c.width, frequency_dim=128, max_period=1000.0)
        self.condition = ConditionEmbedding(c.conditions, c.width)
        self.embed_atom = nn.Linear(2 * c.width, c.width)
        self.reveal = RevealEmbedding(c.width) if c.reveal_noise else None
        self.layers = nn.ModuleList(CSPLayer(c.width, c.frequencies) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        if c.outputs is None:
            self.coord_head = nn.Linear(c.width, 3, bias=False)  # a bias would be a velocity shared by all atoms
            self.type_head = nn.Linear(c.width, c.elements)
            self.lattice_head = _mlp(c.width, LATTICE_DIM, c.width)
        else:
            self.router_head = _mlp(2 * c.width + LATTICE_DIM, c.outputs, c.width)

    def forward(self, x_t: dict[str, Tensor], t: Tensor) -> dict[str, Tensor] | Tensor:
        c, b = self.config, len(t)
        atom_batch, lattice = x_t["atom_batch"], x_t["lattice"].float()
        context = self.time(t) + self.condition(x_t, b, t.device)  # [B, W]
        h = self.embed_atom(torch.cat([self.embed_type(x_t["atom_type"]), context[atom_batch]], -1))
        reveal = self.reveal(x_t, "atom_type", c.elements) if self.reveal else None
        if reveal is not None:
            h = h + reveal
        pairs = cell_pairs(atom_batch, b)
        i, j = pairs
        frac = x_t["frac_coords"].float()
        periodic = fourier(frac[j] - frac[i], c.frequencies)
        neighbours = torch.bincount(i, minlength=len(h)).clamp_min(1)[:, None].to(h.dtype)
        for layer in self.layers:
            h = layer(h, pairs, lattice[atom_batch[i]], periodic, neighbours)
        h = self.norm(h)
        pooled = mean_per_crystal(h, atom_batch, b)
        if c.outputs is not None:
            return self.router_head(torch.cat([pooled, context, lattice], -1))  # [B, K]
        return {"frac_coords": self.coord_head(h), "atom_type": self.type_head(h),
                "lattice": self.lattice_head(pooled)}
