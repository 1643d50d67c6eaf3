"""Partitioning a data set into K clusters from per-sample features (DDM, Sec. 4.1).

Features are standardized, then clustered with scikit-learn's k-means (seeded, deterministic).
The balanced variant (default, as in the paper's balanced k-means) caps every cluster at
ceil(N / K * (1 + slack)) samples: starting from the k-means centroids, it alternates a
capacity-constrained assignment with centroid updates. scikit-learn has no capacity-constrained
k-means, so that assignment is ours: samples are placed in order of how much they would lose by
not getting their nearest centroid, each into its nearest cluster that still has room.

Two-stage (the paper's partitioner, `method="two_stage"`): k-means into many fine clusters
(`fine_clusters`, by default 32 K), then the fine centroids, weighted by their sizes, into K
clusters, balanced by assigning whole fine clusters under the same capacity (largest regret
first; a fine cluster that fits nowhere goes where there is most room, so the cap can be exceeded
by less than one fine cluster). It balances at the level of fine clusters, which keeps dense
regions together, and costs one k-means over N samples and one over the fine centroids.

Tiny clusters: a cluster smaller than `min_size` is an error (`PartitionError`) naming the cluster
and suggesting a smaller K or the balanced variant; clusters are never silently merged, since K
fixes the number of experts the user asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans


class PartitionError(ValueError):
    """The features cannot be split into K usable clusters."""


@dataclass(frozen=True)
class Partition:
    """Cluster labels [N], centroids [K, F] in standardized feature space, and the standardization."""

    labels: np.ndarray
    centroids: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.centroids)).tolist()

    def assign(self, features: np.ndarray) -> np.ndarray:
        """The nearest centroid of new samples (for data added after partitioning)."""
        z = (features - self.mean) / self.scale
        return _sq_distances(z, self.centroids).argmin(axis=1)

    def to_dict(self) -> dict:
        return {"centroids": self.centroids.tolist(), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "sizes": self.sizes}


def _sq_distances(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return ((z[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)


def capacity_assign(distances: np.ndarray, capacity: int) -> np.ndarray:
    """Assign samples to clusters (rows to columns of `distances`) with at most `capacity` each."""
    n, k = distances.shape
    order = np.argsort(distances, axis=1)
    regret = np.take_along_axis(distances, order[:, -1:], 1)[:, 0] - distances.min(axis=1)
    labels = np.full(n, -1)
    room = np.full(k, capacity)
    for i in np.argsort(-regret, kind="stable"):
        cluster = next(c for c in order[i] if room[c] > 0)
        labels[i], room[cluster] = cluster, room[cluster] - 1
    return labels


def weighted_capacity_assign(distances: np.ndarray, weights: np.ndarray, capacity: float) -> np.ndarray:
    """Assign weighted items (rows) to clusters (columns) with at most `capacity` total weight each
    where possible; an item that fits nowhere goes to the cluster with most room left."""
    order = np.argsort(distances, axis=1)
    regret = distances.max(axis=1) - distances.min(axis=1)
    labels, room = np.full(len(distances), -1), np.full(distances.shape[1], float(capacity))
    for i in np.argsort(-regret * weights, kind="stable"):
        cluster = next((c for c in order[i] if room[c] >= weights[i]), int(room.argmax()))
        labels[i], room[cluster] = cluster, room[cluster] - weights[i]
    return labels


def kmeans_partition(features: np.ndarray, k: int, seed: int = 0, balanced: bool = True, slack: float = 0.05,
                     min_size: int = 2, iterations: int = 10, method: str = "kmeans",
                     fine_clusters: int = 0) -> Partition:
    """Split N samples into k clusters of their standardized features (see the module docstring)."""
    if method not in ("kmeans", "two_stage"):
        raise PartitionError(f"unknown partition method {method!r}; choose kmeans or two_stage")
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise PartitionError(f"features must be a 2-D array [N, F], got shape {features.shape}")
    if not np.isfinite(features).all():
        raise PartitionError("features contain NaN or infinite values")
    n = len(features)
    if k < 1 or k > n:
        raise PartitionError(f"cannot split {n} samples into K={k} clusters (need 1 <= K <= {n})")
    mean, scale = features.mean(0), features.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (features - mean) / scale
    if method == "two_stage":
        labels, centroids = _two_stage(z, k, seed, balanced, slack, fine_clusters or 32 * k)
    else:
        labels, centroids = _balanced_kmeans(z, k, seed, balanced, slack, iterations)
    sizes = np.bincount(labels, minlength=k)
    if sizes.min() < min_size:
        small = int(sizes.argmin())
        hint = "use fewer clusters" if balanced else "use fewer clusters or balanced=True"
        raise PartitionError(f"cluster {small} has {sizes[small]} samples (< min_size={min_size}) with K={k}: {hint}")
    return Partition(labels=labels, centroids=centroids, mean=mean, scale=scale)


def _two_stage(z: np.ndarray, k: int, seed: int, balanced: bool, slack: float, fine: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Fine k-means, then the size-weighted fine centroids into k (balanced) clusters."""
    fine = min(max(fine, k), len(z))
    first = KMeans(n_clusters=fine, n_init=1, random_state=seed).fit(z)
    fine_labels = first.labels_.astype(np.int64)
    weights = np.bincount(fine_labels, minlength=fine).astype(np.float64)
    used = weights > 0
    second = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(first.cluster_centers_[used],
                                                                     sample_weight=weights[used])
    coarse = np.zeros(fine, dtype=np.int64)
    coarse[used] = second.labels_
    if balanced and k > 1:
        capacity = math.ceil(len(z) / k * (1 + slack))
        coarse[used] = weighted_capacity_assign(_sq_distances(first.cluster_centers_[used], second.cluster_centers_),
                                                weights[used], capacity)
    labels = coarse[fine_labels]
    centroids = np.stack([z[labels == c].mean(0) if (labels == c).any() else second.cluster_centers_[c]
                          for c in range(k)])
    return labels, centroids


def _balanced_kmeans(z: np.ndarray, k: int, seed: int, balanced: bool, slack: float, iterations: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """k-means, then (balanced) capacity-constrained assignments alternated with centroid updates."""
    n = len(z)
    kmeans = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(z)
    labels, centroids = kmeans.labels_.astype(np.int64), kmeans.cluster_centers_
    if balanced and k > 1:
        capacity = math.ceil(n / k * (1 + slack))
        for _ in range(iterations):
            new = capacity_assign(_sq_distances(z, centroids), capacity)
            centroids = np.stack([z[new == c].mean(0) if (new == c).any() else centroids[c] for c in range(k)])
            if np.array_equal(new, labels):
                break
            labels = new
    return labels, centroids
