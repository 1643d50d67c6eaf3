"""The image domain's quality metrics: FID, k-NN precision and recall, and class accuracy.

- FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS
  2017): the Fréchet distance between Gaussians fitted to the features of real and generated images,
  d^2 = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)), computed by torchmetrics' `FrechetInceptionDistance`
  with a feature network passed to it.
- Features: Inception-v3's 2048-d pool features (`inception_net`) where torch-fidelity and the weights are on disk;
  otherwise `FeatureNet`, a small CNN classifier trained on the data set itself, whose penultimate layer gives the
  features, the practice the FID authors recommend for MNIST. Such an FID is comparable only between runs that use
  the same feature net, so reports carry its weight fingerprint.
- Precision and recall (Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing Generative Models",
  NeurIPS 2019), as their code (kynkaat/improved-precision-and-recall-metric) computes them: the radius of each
  reference feature is its distance to its k-th nearest neighbour within its own set, itself excluded; precision is
  the share of generated features inside (<=) at least one real feature's hypersphere, recall the share of real
  features inside at least one generated feature's hypersphere. We use the FID net's features (the paper uses
  VGG-16's) and no radius clamping (their default).
- FID is biased by the sample count, so `image_metrics` reports every score with a floor (real against disjoint real)
  and a ceiling (noise) measured against the same reference at the same count.

Images are numpy uint8 arrays [N, H, W, C] with C in {1, 3}; labels are int64 class indices. Networks take float
[B, C, H, W] in [0, 1] (torchmetrics' `normalize=True` convention).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from archipelago.experts import storage
from archipelago.experts.data import hash_tensors

WEIGHTS_FILE = "feature_net.safetensors"
META_FILE = "feature_net.json"
INCEPTION_FEATURES = 2048


class FeatureNet(nn.Module):
    """A small CNN classifier whose penultimate layer gives the FID features of a data set.

    Three stride-2 conv stages (32, 64, 128 channels; 5x5 then 3x3 kernels; GroupNorm, so that a batch's content
    never changes an image's features), then a global average pool, a linear map to `features` dims with GELU (the
    FID features) and a linear classifier head. On 2 CPU cores it reaches about 98.7% held-out accuracy on MNIST in
    the default 1500 steps of `train_feature_net` (a 3x3 first stage: 98.2%).
    """

    def __init__(self, channels: int, height: int, width: int, classes: int, features: int = 128) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"FeatureNet takes 1 or 3 image channels, got channels={channels}")
        if height < 1 or width < 1 or classes < 2 or features < 1:
            raise ValueError(f"FeatureNet needs height, width, features >= 1 and classes >= 2, got height={height}, "
                             f"width={width}, classes={classes}, features={features}")
        self.config = {"channels": channels, "height": height, "width": width, "classes": classes,
                       "features": features}
        self.num_features = features  # torchmetrics' FID reads the feature dimension from here
        widths = (channels, 32, 64, 128)
        stages = []
        for c_in, c_out, kernel in zip(widths[:-1], widths[1:], (5, 3, 3), strict=True):
            stages += [nn.Conv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2), nn.GroupNorm(8, c_out),
                       nn.GELU()]
        self.body = nn.Sequential(*stages)
        self.embed = nn.Sequential(nn.Linear(widths[-1], features), nn.GELU())
        self.head = nn.Linear(features, classes)

    def forward(self, images: Tensor) -> Tensor:
        """Features [B, F] (float32) of images [B, C, H, W] in [0, 1]."""
        x = self._fit(images)  # [B, C, H, W] at the net's size
        x = self.body(x)  # [B, 128, ceil(H/8), ceil(W/8)]
        return self.embed(x.mean(dim=(2, 3)))  # [B, F]

    def logits(self, images: Tensor) -> Tensor:
        """Class logits [B, classes] of images [B, C, H, W] in [0, 1]."""
        return self.head(self(images))

    def _fit(self, images: Tensor) -> Tensor:
        """The images as float32 at the net's size (bilinear resize), so any probe size works."""
        channels, height, width = self.config["channels"], self.config["height"], self.config["width"]
        if images.ndim != 4 or images.shape[1] != channels:
            raise ValueError(f"FeatureNet expects images [B, {channels}, H, W], got shape {tuple(images.shape)}")
        images = images.float()
        if images.shape[2:] != (height, width):
            images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
        return images


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features of images [B, C, H, W] in [0, 1]: grey images are repeated to three channels and
    all are quantized to the uint8 [0, 255] that torch-fidelity's network takes (it resizes to 299 itself)."""

    num_features = INCEPTION_FEATURES

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        self.inception = inception

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
        images = images.expand(-1, 3, -1, -1)  # grey -> RGB; a no-op for 3 channels
        return self.inception((images * 255).round().clamp(0, 255).to(torch.uint8)).float()


def inception_net(weights_path: str) -> nn.Module:
    """Inception-v3's 2048-d features (torchmetrics' `NoTrainInceptionV3`) from a file; nothing is downloaded."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError("inception_net needs torch-fidelity (pip install torch-fidelity) and the Inception-v3 FID "
                          "weights on disk; nothing is downloaded")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no Inception-v3 weights file at {weights_path} (they are never downloaded)")
    from torchmetrics.image.fid import NoTrainInceptionV3

    inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
                                   feature_extractor_weights_path=weights_path)
    return InceptionFeatures(inception).eval()


def _check_images(pixels: np.ndarray, name: str, minimum: int = 1) -> tuple[int, int, int]:
    """The (H, W, C) of a uint8 image array [N, H, W, C] with C in {1, 3} and N >= minimum."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise ValueError(f"{name} must be a uint8 numpy array [N, H, W, C], got "
                         f"{getattr(pixels, 'dtype', type(pixels))} of shape {getattr(pixels, 'shape', None)}")
    if pixels.shape[3] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels (last axis), got shape {pixels.shape}")
    if len(pixels) < minimum:
        raise ValueError(f"{name} has {len(pixels)} images, at least {minimum} are needed")
    return pixels.shape[1], pixels.shape[2], pixels.shape[3]


def _check_labels(labels: np.ndarray, count: int, classes: int, name: str = "labels") -> np.ndarray:
    """Labels as int64 [N] in [0, classes)."""
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be {count} integer class indices, got {labels.dtype} of shape {labels.shape}")
    if count and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"{name} must lie in [0, {classes}), got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def _as_input(pixels: Tensor) -> Tensor:
    """uint8 images [B, H, W, C] -> float32 [B, C, H, W] in [0, 1]."""
    return pixels.permute(0, 3, 1, 2).float() / 255


def _batches(pixels: np.ndarray, batch_size: int) -> Iterator[Tensor]:
    """The images as network inputs, `batch_size` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(pixels), batch_size):
        yield _as_input(torch.tensor(pixels[start:start + batch_size]))  # a copy: the array may be read-only


@torch.no_grad()
def _apply(function: Callable[[Tensor], Tensor], pixels: np.ndarray, batch_size: int) -> Tensor:
    return torch.cat([function(batch) for batch in _batches(pixels, batch_size)])


def features_of(net: nn.Module, pixels: np.ndarray, batch_size: int = 256) -> Tensor:
    """The net's features [N, F] (float64) of images [N, H, W, C]."""
    _check_images(pixels, "pixels")
    return _apply(net.eval(), pixels, batch_size).double()


def class_logits(net: FeatureNet, pixels: np.ndarray, batch_size: int = 256) -> Tensor:
    """The classifier's logits [N, classes] of images [N, H, W, C]."""
    logits = getattr(net, "logits", None)
    if logits is None:
        raise TypeError(f"class scores need a classifier with a `logits` method (FeatureNet), got {type(net)}")
    _check_images(pixels, "pixels", minimum=1)
    net.eval()
    return _apply(logits, pixels, batch_size)


def class_accuracy(net: FeatureNet, pixels: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """The share of images that the classifier assigns to their label."""
    scores = class_logits(net, pixels, batch_size)  # [N, classes]
    labels = torch.from_numpy(_check_labels(labels, len(pixels), scores.shape[1]))
    return float((scores.argmax(dim=1) == labels).double().mean())


def _data_fingerprint(pixels: np.ndarray, labels: np.ndarray) -> str:
    """sha256[:16] of the images' shape and bytes and the labels' bytes (int64)."""
    digest = hashlib.sha256(f"{pixels.shape};".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def _weights_fingerprint(tensors: dict[str, Tensor]) -> str:
    """sha256[:16] of the weights: every tensor's name, dtype, shape and bytes, in name order."""
    return hash_tensors(tensors)


def train_feature_net(pixels: np.ndarray, labels: np.ndarray, classes: int, *, steps: int = 1500,
                      batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                      holdout: float = 0.1) -> tuple[FeatureNet, dict[str, Any]]:
    """Train a FeatureNet to classify the images; returns it in eval mode and a report of its held-out accuracy.

    A seeded permutation holds out its last `holdout` share; AdamW with a cosine learning-rate decay then runs
    `steps` batches drawn epoch by epoch from the rest, without augmentation. The initial weights and the data order
    come from `seed` alone (the global random state is left as it was), so the same call gives the same weights.
    """
    height, width, channels = _check_images(pixels, "pixels", minimum=2)
    labels = _check_labels(labels, len(pixels), classes)
    held = round(holdout * len(pixels))
    if not 0 < holdout < 1 or not 0 < held < len(pixels):
        raise ValueError(f"holdout must leave images on both sides of the split, got {holdout} of {len(pixels)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pixels), generator=generator)
    train_ids, held_ids = order[:-held], order[-held:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(channels, height, width, classes)
    images, targets = torch.tensor(pixels), torch.tensor(labels)  # copies: the arrays may be read-only
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    net.train()
    for ids in _epoch_batches(train_ids, batch_size, steps, generator):
        loss = F.cross_entropy(net.logits(_as_input(images[ids])), targets[ids])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    held_ids = held_ids.numpy()
    report = {"accuracy": class_accuracy(net, pixels[held_ids], labels[held_ids]), "steps": steps,
              "classes": classes, "train_images": len(train_ids), "data_fingerprint": _data_fingerprint(pixels, labels),
              "fingerprint": _weights_fingerprint(net.state_dict()),
              "options": {"batch_size": batch_size, "lr": lr, "seed": seed, "holdout": holdout}}
    return net, report


def _epoch_batches(ids: Tensor, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """`steps` batches of `ids`, each epoch a fresh permutation (a short last batch is dropped)."""
    if not 1 <= batch_size <= len(ids):
        raise ValueError(f"batch_size must be in [1, {len(ids)}] (the training images), got {batch_size}")
    per_epoch = len(ids) // batch_size
    for step in range(steps):
        if step % per_epoch == 0:
            order = ids[torch.randperm(len(ids), generator=generator)]
        start = (step % per_epoch) * batch_size
        yield order[start:start + batch_size]


def save_feature_net(net: FeatureNet, report: dict[str, Any], folder: str | os.PathLike) -> None:
    """Write the weights (safetensors) and then the config and report (JSON) into `folder`, each atomically."""
    tensors = {name: value.detach().contiguous() for name, value in net.state_dict().items()}
    fingerprint = _weights_fingerprint(tensors)
    if report.get("fingerprint") != fingerprint:
        raise ValueError(f"the report's fingerprint {report.get('fingerprint')} is not this net's ({fingerprint})")
    folder = os.fspath(folder)
    storage.write_bytes(storage.join(folder, WEIGHTS_FILE), save_tensors(tensors))
    storage.write_json(storage.join(folder, META_FILE), {"config": net.config, "report": report})


def load_feature_net(folder: str | os.PathLike) -> tuple[FeatureNet, dict[str, Any]]:
    """The FeatureNet (eval mode) and report saved in `folder`; a damaged weights file is a ValueError naming it."""
    folder = os.fspath(folder)
    meta = storage.read_json(storage.join(folder, META_FILE))
    file = storage.join(folder, WEIGHTS_FILE)
    try:
        tensors = load_tensors(storage.read_bytes(file))
    except SafetensorError as error:
        raise storage.DamagedFile(f"{file} is damaged: {error}") from error
    fingerprint, saved = _weights_fingerprint(tensors), meta["report"]["fingerprint"]
    if fingerprint != saved:
        raise storage.DamagedFile(f"{file} is damaged: its weights' fingerprint {fingerprint} is not the saved {saved}")
    net = FeatureNet(**meta["config"])
    net.load_state_dict(tensors)
    return net.eval(), meta["report"]


def cached_feature_net(pixels: np.ndarray, labels: np.ndarray, classes: int, cache_dir: str | os.PathLike,
                       **train_options: Any) -> tuple[FeatureNet, dict[str, Any]]:
    """`train_feature_net` run once per data set and options, then loaded from
    `cache_dir/feature-net-<data fingerprint>-<options hash>`."""
    call = inspect.signature(train_feature_net).bind(pixels, labels, classes, **train_options)
    call.apply_defaults()
    options = {name: value for name, value in call.arguments.items() if name not in ("pixels", "labels")}
    options_hash = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    _check_images(pixels, "pixels")
    data = _data_fingerprint(pixels, _check_labels(labels, len(pixels), classes))
    folder = storage.join(os.fspath(cache_dir), f"feature-net-{data}-{options_hash}")
    if storage.exists(storage.join(folder, META_FILE)):  # written last: its presence marks a complete entry
        return load_feature_net(folder)
    net, report = train_feature_net(pixels, labels, classes, **train_options)
    save_feature_net(net, report, folder)
    return net, report


class _Given(nn.Module):
    """The "feature network" that hands torchmetrics features computed beforehand (each set is featurized once,
    for FID and for precision and recall alike)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class FidReference:
    """One real image set featurized once, scored against many generated sets (torchmetrics' FID)."""

    def __init__(self, real: np.ndarray, net: nn.Module, batch_size: int = 256) -> None:
        self.shape = _check_images(real, "real", minimum=2)
        self.net, self.batch_size = net, batch_size
        self.features = features_of(net, real, batch_size)  # [N, F]
        self._metric = FrechetInceptionDistance(feature=_Given(self.features.shape[1]), reset_real_features=False)
        self._metric.update(self.features, real=True)

    def score(self, fake: np.ndarray) -> float:
        """FID of `fake` against the real set."""
        shape = _check_images(fake, "fake", minimum=2)
        if shape != self.shape:
            raise ValueError(f"fake images are (H, W, C) = {shape}, the real ones {self.shape}")
        return self.score_features(features_of(self.net, fake, self.batch_size))

    def score_features(self, features: Tensor) -> float:
        """FID of generated images given by their features [N, F]; only the fake statistics are reset afterwards."""
        if features.ndim != 2 or len(features) < 2 or features.shape[1] != self.features.shape[1]:
            raise ValueError(f"expected features [N >= 2, {self.features.shape[1]}], got {tuple(features.shape)}")
        try:
            self._metric.update(features, real=False)
            return float(self._metric.compute())
        finally:
            self._metric.reset()


def fid(real: np.ndarray, fake: np.ndarray, net: nn.Module, batch_size: int = 256) -> float:
    """FID of `fake` against `real` over the net's features."""
    return FidReference(real, net, batch_size).score(fake)


def _as_features(features: np.ndarray | Tensor, name: str, k: int) -> Tensor:
    features = torch.as_tensor(features, dtype=torch.float64)
    if features.ndim != 2 or len(features) <= k:
        raise ValueError(f"{name} must be features [N, F] with N > k = {k}, got shape {tuple(features.shape)}")
    return features


def _distance_blocks(queries: Tensor, references: Tensor, rows: int = 512) -> Iterator[Tensor]:
    """Euclidean distances [rows, M] from `rows` queries at a time to every reference (exact, not via matmul, so
    that a point's distance to itself is 0)."""
    for block in queries.split(rows):
        yield torch.cdist(block, references, compute_mode="donot_use_mm_for_euclid_dist")


def _knn_radii(features: Tensor, k: int) -> Tensor:
    """Each feature's distance to its k-th nearest neighbour in its own set, itself excluded."""
    return torch.cat([distances.kthvalue(k + 1, dim=1).values for distances in _distance_blocks(features, features)])


def _share_inside(queries: Tensor, centres: Tensor, radii: Tensor) -> float:
    """The share of queries inside (<=) at least one centre's hypersphere."""
    inside = torch.cat([(distances <= radii).any(dim=1) for distances in _distance_blocks(queries, centres)])
    return float(inside.double().mean())


def precision_recall(real_features: np.ndarray | Tensor, fake_features: np.ndarray | Tensor,
                     k: int = 3) -> tuple[float, float]:
    """k-NN precision and recall of generated features against real ones (Kynkäänniemi et al. 2019)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real = _as_features(real_features, "real_features", k)
    fake = _as_features(fake_features, "fake_features", k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real_features have {real.shape[1]} dims, fake_features {fake.shape[1]}")
    return _share_inside(fake, real, _knn_radii(real, k)), _share_inside(real, fake, _knn_radii(fake, k))


def noise_images(n: int, height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """The noise ceiling's images: i.i.d. N(0.5, 0.5^2) per pixel, clipped to [0, 1], as uint8 [n, H, W, C].

    This is the diffusion prior N(0, I) of the [-1, 1] pixel convention mapped to [0, 1], i.e. what a sampler with
    an untrained network would return: the worst score a generator can reasonably get.
    """
    values = np.random.default_rng(seed).normal(0.5, 0.5, size=(n, height, width, channels))
    return np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)


def _reference_and_floor(real: np.ndarray, floor_real: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference (real[:n]) and the floor set (floor_real[:n], else real[n:2n]): both of the generated count n."""
    if floor_real is None:
        if len(real) < 2 * n:
            raise ValueError(f"real has {len(real)} images; without floor_real it needs 2 x {n} (the generated count):"
                             f" {n} as the reference and {n} disjoint ones for the floor")
        return real[:n], real[n:2 * n]
    if len(real) < n or len(floor_real) < n:
        raise ValueError(f"real has {len(real)} and floor_real {len(floor_real)} images; each needs {n} "
                         "(the generated count)")
    return real[:n], floor_real[:n]


def image_metrics(real: np.ndarray, fake: np.ndarray, net: nn.Module, *, floor_real: np.ndarray | None = None,
                  fake_labels: np.ndarray | None = None, seed: int = 0, k: int = 3,
                  report: dict[str, Any] | None = None) -> dict[str, float | str]:
    """FID, precision and recall of `fake`, with the floor (disjoint real images) and ceiling (noise) FID, all
    against the first len(fake) real images; `accuracy` of the feature net on class-conditional `fake_labels`."""
    shape = _check_images(real, "real")
    fake_shape = _check_images(fake, "fake", minimum=2)
    if fake_shape != shape:
        raise ValueError(f"real images are (H, W, C) = {shape}, fake ones {fake_shape}")
    if floor_real is not None and _check_images(floor_real, "floor_real") != shape:
        raise ValueError(f"real images are (H, W, C) = {shape}, floor_real ones {floor_real.shape[1:]}")
    n = len(fake)
    reference, floor = _reference_and_floor(real, floor_real, n)
    scorer = FidReference(reference, net)
    fake_features, floor_features = features_of(net, fake), features_of(net, floor)
    precision, recall = precision_recall(scorer.features, fake_features, k)
    floor_precision, floor_recall = precision_recall(scorer.features, floor_features, k)
    metrics: dict[str, float | str] = {
        "fid": scorer.score_features(fake_features), "fid_floor": scorer.score_features(floor_features),
        "fid_ceiling": scorer.score(noise_images(n, *shape, seed=seed)),
        "precision": precision, "recall": recall, "floor_precision": floor_precision, "floor_recall": floor_recall,
        "feature_net": report["fingerprint"] if report is not None else "custom", "n": n}
    if fake_labels is not None:
        metrics["accuracy"] = class_accuracy(net, fake, fake_labels)
    return metrics
