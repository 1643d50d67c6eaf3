"""Two small domains that exercise the core through the same code paths as real domains.

- `VectorDomain`: points in R^d (one Gaussian field), for the analytic mixture-of-Gaussians tests.
- `PointSetDomain`: variable-size point sets on the flat torus [0, 1)^2 with one categorical label
  per point: a periodic field and a discrete field, both ragged, as crystals and graphs will have.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from archipelago.experts.batch import FieldSpec
from archipelago.experts.data import DenseSamples, RaggedSamples
from archipelago.experts.domain import Domain
from archipelago.experts.paths import GaussianPath, MaskedPath, TorusPath


def _mlp(inputs: int, outputs: int, width: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, outputs))


class VectorNet(nn.Module):
    """An MLP on (x_t[field], t): outputs under `key`, or router logits when `key` is None."""

    def __init__(self, dim: int, outputs: int, key: str | None = "x", field: str = "x"):
        super().__init__()
        self.mlp, self.key, self.field = _mlp(dim + 1, outputs), key, field

    def forward(self, x_t, t):
        out = self.mlp(torch.cat([x_t[self.field], t[:, None]], dim=1))
        return {self.key: out} if self.key else out


class VectorDomain(Domain):
    name = "vectors"

    def __init__(self, dim: int = 2):
        self.dim = dim

    @property
    def fields(self):
        return {"x": FieldSpec(GaussianPath())}

    def ingest(self, source, fit=True):
        return pa.table({"x": pa.array(np.asarray(source, dtype=np.float32).tolist())})

    def samples(self, table):
        return DenseSamples({"x": torch.tensor(np.array(table["x"].to_pylist(), dtype=np.float32))})

    def features(self, table):
        return np.array(table["x"].to_pylist())

    def denoiser_network(self):
        return VectorNet(self.dim, self.dim)

    def router_network(self, num_experts):
        return VectorNet(self.dim, num_experts, key=None)

    def template(self, n, generator=None, statistics=None, given=None):
        return {"x": torch.zeros(n, self.dim)}

    def decode(self, batch):
        return batch["x"].numpy()

    def evaluate(self, real, generated, **options):
        return {"mean_error": float(abs(self.features(real).mean(0) - generated["x"].numpy().mean(0)).max())}

    def to_config(self):
        return {"dim": self.dim}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class PointSetNet(nn.Module):
    """DeepSets: per-point MLP on (pos as sin/cos, label embedding, t) plus the mean over its set."""

    def __init__(self, categories: int, outputs: dict[str, int] | int, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(categories + 1, width)  # + the mask token
        self.point = _mlp(4 + width + 1, width, width)
        self.outputs = outputs
        if isinstance(outputs, dict):  # per-point outputs read the point and its set
            self.heads = nn.ModuleDict({name: _mlp(2 * width, size, width) for name, size in outputs.items()})
        else:  # per-set logits read the set
            self.heads = nn.ModuleDict({"logits": _mlp(width, outputs, width)})

    def forward(self, x_t, t):
        index = x_t["batch"]
        angle = 2 * torch.pi * x_t["pos"]
        h = self.point(torch.cat([angle.sin(), angle.cos(), self.embed(x_t["label"]), t[index, None]], 1))
        b = len(t)
        pooled = torch.zeros(b, h.shape[1]).index_add_(0, index, h)
        pooled = pooled / torch.bincount(index, minlength=b).clamp_min(1)[:, None]
        if isinstance(self.outputs, int):
            return self.heads["logits"](pooled)
        per_point = torch.cat([h, pooled[index]], 1)
        return {name: head(per_point) for name, head in self.heads.items()}


class PointSetDomain(Domain):
    name = "pointsets"

    def __init__(self, categories: int = 3, sizes: tuple[int, ...] = (3, 4, 5)):
        self.categories, self.sizes = categories, tuple(sizes)

    @property
    def fields(self):
        return {"label": FieldSpec(MaskedPath(self.categories), index="batch"),
                "pos": FieldSpec(TorusPath(), index="batch")}

    def ingest(self, source, fit=True):
        return pa.table({"pos": [p.tolist() for p, _ in source], "label": [lab.tolist() for _, lab in source]})

    def samples(self, table):
        pos = [np.array(p, dtype=np.float32).reshape(-1, 2) for p in table["pos"].to_pylist()]
        labels = [np.array(lab, dtype=np.int64) for lab in table["label"].to_pylist()]
        return RaggedSamples({"pos": torch.tensor(np.concatenate(pos)), "label": torch.tensor(np.concatenate(labels))},
                             sizes=torch.tensor([len(p) for p in pos]))

    def features(self, table):
        return np.array([[np.mean(lab), len(lab)] for lab in table["label"].to_pylist()], dtype=float)

    def denoiser_network(self):
        return PointSetNet(self.categories, {"pos": 2, "label": self.categories})

    def router_network(self, num_experts):
        return PointSetNet(self.categories, num_experts)

    def template(self, n, generator=None, statistics=None, given=None):
        choice = torch.randint(len(self.sizes), (n,), generator=generator)
        counts = torch.tensor(self.sizes)[choice]
        rows = int(counts.sum())
        return {"pos": torch.zeros(rows, 2), "label": torch.zeros(rows, dtype=torch.long),
                "batch": torch.repeat_interleave(torch.arange(n), counts)}

    def decode(self, batch):
        return [(batch["pos"][batch["batch"] == i].numpy(), batch["label"][batch["batch"] == i].numpy())
                for i in range(int(batch["batch"].max()) + 1)]

    def evaluate(self, real, generated, **options):
        return {"valid_labels": float((generated["label"] < self.categories).float().mean())}

    def to_config(self):
        return {"categories": self.categories, "sizes": list(self.sizes)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def point_sets(n: int, categories: int = 3, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sets of 3-5 points: label c sits near (c + 1) / (categories + 1) on both axes (mod 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        size = int(rng.integers(3, 6))
        labels = rng.integers(0, categories, size)
        centre = (labels + 1) / (categories + 1)
        pos = np.mod(centre[:, None] + 0.03 * rng.standard_normal((size, 2)), 1.0)
        out.append((pos.astype(np.float32), labels))
    return out
