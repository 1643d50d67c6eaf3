"""Routing diagnostics: how well the router knows the partition along t, and which clusters samples cover.

- `router_calibration`: on clean records with their partition labels, noised at fixed times t
  along the experts' own paths, the router's top-1 accuracy, its expected calibration error (ECE,
  torchmetrics' `MulticlassCalibrationError`, l1 norm: the confidence-weighted gap between
  confidence and accuracy over equal-width confidence bins), its mean confidence and the mean
  entropy of p(k | x_t, t). A router that is right at t = 0.1 and near uniform at t = 1 makes
  top-1's first steps a fixed choice of one expert on no information.
- `coverage`: the share of generated samples nearest to each cluster's centroid (in the
  partition's standardized feature space, `Partition.assign`) against the clusters' shares of the
  data, and their total variation distance, 1/2 sum_k |share_k - size_k / N|.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassCalibrationError

from archipelago.experts.batch import Batch, Fields
from archipelago.experts.denoiser import noise_batch
from archipelago.router.likelihood import LikelihoodRouter
from archipelago.router.partition import Partition
from archipelago.router.training import Router

TIMES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def router_calibration(router: Router | LikelihoodRouter, fields: Fields, batch: Batch, labels: Tensor,
                       times: Sequence[float] = TIMES, bins: int = 15, seed: int = 0) -> list[dict[str, float]]:
    """Accuracy, ECE, confidence and entropy of the router at each t (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    rows = []
    with torch.no_grad():
        for t in times:
            noised = noise_batch(batch, fields, generator, t=torch.full((n,), float(t)))
            posterior = router.posterior(noised.x_t, noised.t).float().cpu()
            k = posterior.shape[1]
            ece = MulticlassCalibrationError(num_classes=k, n_bins=bins, norm="l1")(posterior, labels.long())
            entropy = -(posterior * posterior.clamp_min(1e-12).log()).sum(1)
            rows.append({"t": float(t), "accuracy": float((posterior.argmax(1) == labels).float().mean()),
                         "ece": float(ece), "confidence": float(posterior.max(1).values.mean()),
                         "entropy": float(entropy.mean()), "uniform_entropy": float(np.log(k))})
    return rows


def coverage(features: np.ndarray, partition: Partition, sizes: Sequence[int]) -> dict[str, Any]:
    """Shares of samples per cluster against the data's, and their total variation (module docstring)."""
    if len(sizes) != len(partition.centroids):
        raise ValueError(f"{len(sizes)} cluster sizes for {len(partition.centroids)} centroids")
    nearest = partition.assign(features)
    shares = np.bincount(nearest, minlength=len(sizes)) / len(nearest)
    expected = np.asarray(sizes, dtype=np.float64) / np.sum(sizes)
    return {"shares": shares.tolist(), "expected": expected.tolist(),
            "total_variation": float(0.5 * np.abs(shares - expected).sum())}
