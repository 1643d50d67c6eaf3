"""The router p(k | x_t, t) and its training (DDM, Sec. 3: cross-entropy on noised samples).

The router sees a sample noised along the same paths the experts use, at t ~ U[0, 1], and learns
which partition its clean sample came from. The domain supplies the backbone; the router is that
network plus a softmax. Training reuses the experts' loop (`run_training`), checkpoints included.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from archipelago.experts.batch import Batch, Fields
from archipelago.experts.conditions import Conditions, drop_conditions
from archipelago.experts.data import Samples, hash_tensors
from archipelago.experts.denoiser import noise_batch
from archipelago.experts.domain import Domain
from archipelago.experts.training import OnLog, ProgressBar, TrainConfig, TrainResult, run_training, seeded

LABEL = "partition"  # the batch key of the cluster label during router training


class RouterConfig(BaseModel):
    """The router: how many experts it chooses among, and how it trains."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_experts: int = Field(ge=1)
    train: TrainConfig = TrainConfig()


class LabelledSamples(Samples):
    """Samples whose batches also carry each sample's partition label under `LABEL`."""

    def __init__(self, samples: Samples, labels: Tensor):
        if len(labels) != len(samples):
            raise ValueError(f"{len(labels)} partition labels for {len(samples)} samples")
        self.inner, self.labels = samples, labels.long()

    def __len__(self) -> int:
        return len(self.inner)

    def batch(self, ids: Tensor) -> Batch:
        return {**self.inner.batch(ids), LABEL: self.labels[ids]}

    def block_sizes(self) -> list[int]:
        return self.inner.block_sizes()

    def fingerprint(self) -> str:
        return f"{self.inner.fingerprint()}-{hash_tensors({LABEL: self.labels})}"


class Router(nn.Module):
    """A routing network over the fields of a domain: logits and posterior p(k | x_t, t)."""

    def __init__(self, net: nn.Module, fields: Fields):
        super().__init__()
        self.net, self.fields = net, fields

    def forward(self, x_t: Batch, t: Tensor) -> Tensor:
        return self.net(x_t, t)  # [B, K] logits

    def posterior(self, x_t: Batch, t: Tensor) -> Tensor:
        return self(x_t, t).softmax(dim=-1)  # [B, K]


def router_loss(model: nn.Module, fields: Fields, batch: Batch, generator: torch.Generator,
                conditions: Conditions | None = None, condition_dropout: float = 0.0) -> Tensor:
    """Cross-entropy of the router on x_t ~ p_t(. | x_0), t ~ U[0, 1], against x_0's partition; its
    conditions are dropped to null as the experts' are, so it learns p(k | x_t, t, c) and p(k | x_t, t)."""
    batch = drop_conditions(batch, conditions or {}, condition_dropout, generator)
    noised = noise_batch(batch, fields, generator)
    return nn.functional.cross_entropy(model(noised.x_t, noised.t), batch[LABEL])


def train_router(config: RouterConfig, domain: Domain, samples: Samples, labels: Tensor, folder: str,
                 on_log: OnLog | None = None, progress_bar: ProgressBar | None = None) -> TrainResult:
    """Train the router on all samples with their partition labels, checkpointing to `folder`;
    `progress_bar` makes the bar (see `archipelago.experts.training.ProgressBar`)."""
    if int(labels.max()) >= config.num_experts or int(labels.min()) < 0:
        raise ValueError(f"partition labels must lie in [0, {config.num_experts}), "
                         f"got [{int(labels.min())}, {int(labels.max())}]")
    fields = domain.fields
    router = Router(seeded(lambda: domain.router_network(config.num_experts), config.train.seed), fields)

    def loss_fn(model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        return router_loss(model, fields, batch, generator, domain.conditions, config.train.condition_dropout)

    meta = {"kind": "router", "domain": domain.name, "domain_config": domain.to_config(),
            "config": {"num_experts": config.num_experts}}
    return run_training(router, loss_fn, LabelledSamples(samples, labels), config.train, folder, meta,
                        on_log, description="router", progress_bar=progress_bar)
