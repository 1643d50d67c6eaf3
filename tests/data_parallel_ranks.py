"""What each process of the DDP tests in test_data_parallel.py runs (kept apart from the test module,
so that a spawned process imports torch and the core only, not Ray or MLflow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from archipelago.experts.data import DenseSamples
from archipelago.experts.training import ExpertConfig, TrainConfig, run_training, seeded, train_expert
from tests.toy_domains import VectorDomain

REGRESSION = TrainConfig(steps=3, batch_size=8, warmup_steps=1, progress=False, device="cpu")


def regression_samples() -> DenseSamples:
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return DenseSamples({"x": x, "y": x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.1})


def regression_loss(model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """No noise: a rank's loss depends on its samples alone, so 1 and 2 ranks can be compared exactly."""
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


def train_regression(folder: str) -> nn.Module:
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double(), 0)
    run_training(model, regression_loss, regression_samples(), REGRESSION, folder, {})
    return model


def expert(steps: int) -> ExpertConfig:
    return ExpertConfig(partition=0, train=TrainConfig(steps=steps, batch_size=16, warmup_steps=1, checkpoint_every=2,
                                                       progress=False, device="cpu"))


def train_ranks(rank: int, world: int, tmp: Path) -> None:
    """One of `world` processes: the regression, then an expert in one go and with a resume."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank, world_size=world)
    try:
        save_file(train_regression(str(tmp / "regression")).state_dict(), tmp / f"regression-{rank}.safetensors")
        domain = VectorDomain(dim=3)
        samples = domain.samples(domain.ingest(np.random.default_rng(0).normal(size=(100, 3))))
        for name, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
            train_expert(expert(steps), domain, samples, str(tmp / name))
    finally:
        dist.destroy_process_group()


