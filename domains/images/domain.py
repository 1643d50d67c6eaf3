"""The image domain: images diffused in pixel space or in the latent space of a KL autoencoder.

Fields: `image` [B, C, H, W] in [-1, 1] on the affine Gaussian path (pixel space), or with `latent=True`
`latent` [B, c, H / f, W / f] (latent diffusion, Rombach et al. 2022): the codec is diffusers'
`AutoencoderKL`, trained on the run's images as a step of the run, or a user's pretrained one
(`autoencoder=<local folder>`); either way its weights are a checkpoint of the run. Denoisers are diffusers'
`UNet2DModel` or `DiTTransformer2DModel` (`denoiser`, `preset`; see `networks.py`), predicting velocity;
the router is a small time-conditioned ResNet.

Class labels (class sub-folders, IDX label files, a label column) become the categorical condition `label`
with classifier-free guidance. Partition features are pluggable (`features`, see `features.py`): "pca"
(the default, no download: PCA of 8x8 area thumbnails), "dinov2:<local folder>" (the DDM paper clusters
DINOv2 features) or a user's "module:function".

Sources for `ingest` (see `io.read_images`): a folder of image files (one sub-folder per class), an IDX
file, numpy arrays or .npy/.npz files, PIL images, Parquet with encoded image bytes (read block by
block), and our own records. Modes and sizes are normalized as `ImageFormat` says, with the counts
logged; unreadable files are dropped and counted, more than `max_dropped` of them an error before any
training. Metrics (`evaluate`): FID with its real-vs-real floor and noise ceiling, precision and recall,
and the class accuracy of conditioned samples, in the features of a classifier trained on the data
(or of Inception, from local weights): see `metrics.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from diffusers import AutoencoderKL
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from archipelago.domains.images import data, features, io, metrics, writers
from archipelago.domains.images.networks import (
    DENOISERS,
    FIELD,
    LATENT,
    ImageNetConfig,
    LatentCodec,
    RouterCNN,
    autoencoder,
    autoencoder_preset,
    latent_shape,
    pretrained_autoencoder,
)
from archipelago.experts.batch import Batch, Fields, FieldSpec
from archipelago.experts.conditions import Condition
from archipelago.experts.data import DenseSamples
from archipelago.experts.domain import Domain
from archipelago.experts.paths import GaussianPath

log = logging.getLogger(__name__)
LABEL = "label"  # the class condition


class ImageConfig(BaseModel):
    """Inputs, networks, partition features and (once data is ingested) the fitted shape, classes and PCA."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: tuple[int, int] | None = None  # (height, width); None: the first training image's (fitted)
    channels: Literal[1, 3] | None = None  # None: the first training image's (fitted)
    fit: Literal["crop", "resize", "pad"] = "crop"  # how images of another size reach `size` (io.ImageFormat)
    background: int = Field(255, ge=0, le=255)  # grey level transparent pixels are composited over
    max_dropped: float = Field(0.01, ge=0.0, le=1.0)  # share of unreadable images that may be dropped
    label_column: str = "label"  # of Parquet input
    image_column: str = "image"
    id_column: str | None = None
    conditional: bool = True  # class labels, where the data has them, become the `label` condition
    denoiser: Literal["unet", "dit"] = "unet"
    preset: str = "small"  # networks.UNET_PRESETS / DIT_PRESETS
    denoiser_options: dict[str, Any] = {}  # overrides of the preset (diffusers config keys)
    router_width: int = Field(32, ge=8)
    router_depth: int = Field(2, ge=1)
    latent: bool = False  # diffuse the latents of a KL autoencoder
    autoencoder: str | None = None  # a local folder holding a pretrained AutoencoderKL (implies latent)
    autoencoder_preset: str = "small"  # networks.AUTOENCODER_PRESETS, for one trained in the run
    latent_channels: int | None = Field(None, ge=1)  # None: 4 when trained in the run, a pretrained one's own
    kl_weight: float = Field(1e-6, ge=0.0)
    finetune_autoencoder: bool = False  # train a pretrained autoencoder further on the run's images
    features: str = "pca"  # partition features: "pca", "dinov2:<local folder>" or "module:function"
    feature_side: int = Field(8, ge=1)  # PCA features: side of the area thumbnails
    feature_components: int = Field(32, ge=1)  # PCA features: components kept
    feature_net_steps: int = Field(1500, ge=1)  # evaluate: training steps of the FID feature network
    classes: list[str] | None = None  # fitted: the class names, in order
    pca_mean: list[float] | None = None  # fitted
    pca_components: list[list[float]] | None = None  # fitted
    autoencoder_config: dict[str, Any] | None = None  # fitted: a pretrained autoencoder's config

    @model_validator(mode="before")
    @classmethod
    def _pretrained_means_latent(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("autoencoder") is not None:
            return {**values, "latent": True}
        return values


class ImageDomain(Domain):
    """Images, unconditional or class-conditional, in pixel or latent space."""

    name = "images"

    def __init__(self, config: ImageConfig | dict[str, Any] | None = None, **overrides: Any):
        merged = {**(config.model_dump() if isinstance(config, ImageConfig) else (config or {})), **overrides}
        self.config = ImageConfig(**merged)

    # --- shape ---------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of the images."""
        c = self.config
        if c.size is None or c.channels is None:
            raise ValueError("the image domain has no image shape yet: ingest training data first (or set size "
                             "and channels)")
        return c.size[0], c.size[1], c.channels

    def _latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the latents, from the autoencoder's config alone (no network built)."""
        c, (h, w, channels) = self.config, self.shape
        if c.autoencoder is None:
            options = {**autoencoder_preset(c.autoencoder_preset), "latent_channels": c.latent_channels or 4}
        else:  # fitted at ingest; read from the folder only where the domain was configured by hand
            options = c.autoencoder_config or pretrained_autoencoder(c.autoencoder, channels, c.latent_channels).config
        return latent_shape(options, h, w)

    def _net_config(self) -> ImageNetConfig:
        conditions = tuple(self.conditions.values())
        if self.config.latent:
            channels, h, w = self._latent_shape()
            return ImageNetConfig(channels, h, w, field=LATENT, conditions=conditions)
        h, w, channels = self.shape
        return ImageNetConfig(channels, h, w, conditions=conditions)

    @property
    def fields(self) -> Fields:
        return {LATENT if self.config.latent else FIELD: FieldSpec(GaussianPath())}

    @property
    def conditions(self) -> dict[str, Condition]:
        classes = self.config.classes
        return {LABEL: Condition(LABEL, classes=tuple(classes))} if self.config.conditional and classes else {}

    # --- records -------------------------------------------------------------------------------------

    def ingest(self, source: Any, fit: bool = True) -> pa.Table:
        """Read and normalize images (see the module docstring) as records. fit=True fixes the image shape,
        the classes and the PCA features from this data; fit=False reads with them."""
        c = self.config
        fmt = io.ImageFormat(size=c.size, channels=c.channels, fit=c.fit, background=c.background)
        report = io.ReadReport()
        blocks = [data.images_to_table(block) for block in io.read_images(
            source, fmt, report=report, label_column=c.label_column, image_column=c.image_column,
            id_column=c.id_column)]
        io.check_dropped(report, c.max_dropped)  # and logs the drops and normalizations
        table = data.concat_tables(blocks)
        if fit:
            self.config = self.config.model_copy(update=self._fitted(table))
        else:
            self._check_labels(table)
        return table

    def _fitted(self, table: pa.Table) -> dict[str, Any]:
        h, w, channels = data.image_shape(table)
        labels = table.column(LABEL).to_pylist() if LABEL in table.column_names else []
        classes = sorted({label for label in labels if label is not None}, key=_natural) or None
        fitted = {"size": (h, w), "channels": channels, "classes": classes}
        if self.config.features == "pca":
            fitted |= features.fit_pca(data.table_to_images(table).pixels, self.config.feature_side,
                                       self.config.feature_components)
        else:
            features.extractor(self.config.features)  # an extractor that cannot load fails here, before any work
        if self.config.autoencoder is not None:
            model = pretrained_autoencoder(self.config.autoencoder, channels, self.config.latent_channels)
            fitted["autoencoder_config"] = dict(model.config)
        return fitted

    def _check_labels(self, table: pa.Table) -> None:
        if LABEL not in table.column_names or not self.conditions:
            return
        unknown = sorted({v for v in table.column(LABEL).to_pylist() if v is not None} - set(self.config.classes),
                         key=_natural)
        if unknown:
            raise ValueError(f"labels {unknown[:10]} are not classes of this run ({self.config.classes})")

    def samples(self, table: pa.Table) -> DenseSamples:
        images = data.table_to_images(table)
        tensors = {FIELD: data.to_unit(images.pixels)}
        if self.conditions:
            tensors[LABEL] = self._label_codes(images.labels, len(images.ids))
        return DenseSamples(tensors)

    def _label_codes(self, labels: list[str | None] | None, n: int) -> torch.Tensor:
        condition = self.conditions[LABEL]
        return torch.tensor([condition.encode(v) for v in (labels or [None] * n)], dtype=torch.long)

    def features(self, table: pa.Table) -> np.ndarray:
        """Partition features (see `features.py`): PCA of thumbnails (fitted at ingest), DINOv2's, or a user's."""
        c, pixels = self.config, data.table_to_images(table).pixels
        if c.features == "pca":
            return features.pca_features(pixels, c.feature_side, c.pca_mean, c.pca_components)
        return np.asarray(features.extractor(c.features)(pixels), dtype=np.float64)

    # --- networks ------------------------------------------------------------------------------------

    def denoiser_network(self) -> nn.Module:
        c = self.config
        return DENOISERS[c.denoiser](self._net_config(), c.preset, **c.denoiser_options)

    def router_network(self, num_experts: int) -> nn.Module:
        return RouterCNN(self._net_config(), num_experts, self.config.router_width, self.config.router_depth)

    def codec_network(self) -> nn.Module | None:
        """The latent stage: a fresh KL autoencoder, or the user's pretrained one (frozen unless
        `finetune_autoencoder`), with its scale."""
        c = self.config
        if not c.latent:
            return None
        h, w, channels = self.shape
        if c.autoencoder is None:
            return LatentCodec(autoencoder(channels, h, w, c.autoencoder_preset, c.latent_channels or 4), scale=1.0,
                               kl_weight=c.kl_weight)
        if c.autoencoder_config is not None and not Path(c.autoencoder).is_dir():
            # Elsewhere than where the run was made (an MLflow model, another machine): the architecture from the
            # fitted config; the weights are the run's codec checkpoint, which the run was given at its encode step.
            model = AutoencoderKL.from_config(c.autoencoder_config)
        else:
            model = pretrained_autoencoder(c.autoencoder, channels, c.latent_channels)
        model.requires_grad_(c.finetune_autoencoder)
        return LatentCodec(model, scale=model.config.scaling_factor, kl_weight=c.kl_weight, estimate_scale=False)

    # --- sampling ------------------------------------------------------------------------------------

    def template(self, n: int, generator: torch.Generator | None = None, statistics: dict | None = None,
                 given: Mapping[str, Any] | None = None) -> Batch:
        if given:
            raise ValueError(f"the image domain takes no given fields; got {sorted(given)}")
        config = self._net_config()
        return {config.field: torch.zeros(n, config.channels, config.height, config.width)}

    def decode(self, batch: Batch) -> list[Image.Image]:
        """Generated images as PIL images; a conditioned sample's class name is in `image.info["label"]`."""
        images = self._images(batch)
        out = []
        for pixels, label in zip(images.pixels, images.labels or [None] * len(images.ids), strict=True):
            image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            if label is not None:
                image.info["label"] = label
            out.append(image)
        return out

    def _images(self, batch: Batch) -> io.Images:
        if FIELD not in batch:
            raise ValueError("the batch holds no images: decode latents with the run's codec first")
        pixels = data.from_unit(batch[FIELD].detach().cpu().float())
        labels = None
        if LABEL in batch and self.conditions:
            classes = self.config.classes
            labels = [classes[i] if i < len(classes) else None for i in batch[LABEL].tolist()]
        return io.Images(pixels=pixels, ids=[f"sample-{i}" for i in range(len(pixels))], labels=labels)

    def grid(self, batch: Batch, columns: int | None = None) -> Image.Image:
        """Generated images as one sample grid (what `sample --out grid.png` writes and a tracked fit logs)."""
        return writers.grid(self._images(batch).pixels, columns)

    def sample_records(self, batch: Batch) -> pa.Table:
        """Generated images as records (the Parquet format `ingest` reads back)."""
        return data.images_to_table(self._images(batch))

    def evaluate(self, real: pa.Table, generated: Batch, **options: Any) -> dict[str, Any]:
        """FID against `real` with its real-vs-real floor and noise ceiling, precision and recall, and the
        class accuracy of conditioned samples (metrics.image_metrics), in the features of:
        `inception` (a local Inception weights file), `feature_net` (a folder saved by
        metrics.save_feature_net), or else a classifier trained on `train` (records or a source; default
        `real`), cached in `cache_dir` when given. The first n real images are the reference and the next
        n the floor's, n = the number of samples. Other options: `seed`, `metrics` (names to report)."""
        options.pop("repeats", None)
        options.pop("progress", None)
        names, seed = options.pop("metrics", None), options.pop("seed", 0)
        features = {key: options.pop(key, None) for key in ("inception", "feature_net", "train", "cache_dir")}
        if options:
            raise ValueError(f"unknown evaluate options {sorted(options)}: choose from inception, feature_net, train, "
                             f"cache_dir, seed, metrics")
        net, report = self._feature_net(real, **features)
        fake = self._images(generated)
        reference = data.table_to_images(real)
        conditioned = [i for i, label in enumerate(fake.labels or []) if label is not None]
        scores = metrics.image_metrics(reference.pixels, fake.pixels, net, seed=seed, report=report)
        if conditioned:
            codes = {name: i for i, name in enumerate(self.config.classes)}
            scores["accuracy"] = metrics.class_accuracy(
                net, fake.pixels[conditioned], np.array([codes[fake.labels[i]] for i in conditioned]))
        if names:
            unknown = sorted(set(names) - set(scores))
            if unknown:
                raise ValueError(f"unknown image metrics {unknown}; these were computed: {sorted(scores)}")
            scores = {name: scores[name] for name in names}
        return scores

    def _feature_net(self, real: pa.Table, inception: str | None, feature_net: str | None, train: Any,
                     cache_dir: str | None) -> tuple[nn.Module, dict[str, Any] | None]:
        if inception is not None:
            return metrics.inception_net(inception), {"fingerprint": f"inception:{inception}"}
        if feature_net is not None:
            return metrics.load_feature_net(feature_net)
        table = real if train is None else train if isinstance(train, pa.Table) else self.ingest(train, fit=False)
        images = data.table_to_images(table)
        if not images.labels or any(label is None for label in images.labels):
            raise ValueError("the FID feature network is a classifier trained on labelled images: give labelled "
                             "`train` images, a saved `feature_net` or local `inception` weights")
        classes = self.config.classes or sorted(set(images.labels), key=_natural)  # the run's, for `accuracy`
        unknown = sorted(set(images.labels) - set(classes), key=_natural)
        if unknown:
            raise ValueError(f"the feature network's training images have labels {unknown[:10]} outside the "
                             f"classes {classes}")
        labels = np.array([classes.index(label) for label in images.labels])
        train_options = {"steps": self.config.feature_net_steps, "batch_size": min(128, len(labels) // 2)}
        if cache_dir is not None:
            return metrics.cached_feature_net(images.pixels, labels, len(classes), cache_dir, **train_options)
        return metrics.train_feature_net(images.pixels, labels, len(classes), **train_options)

    def to_config(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageDomain:
        return cls(config)


def _natural(name: str) -> tuple[bool, int, str]:
    """Class names in natural order: "2" before "10", numbers before words."""
    return (not name.isdigit(), int(name) if name.isdigit() else 0, name)

