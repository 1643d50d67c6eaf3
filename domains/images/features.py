"""Partition features of images: the clusters the experts train on are k-means clusters of these.

- "pca" (the default; nothing to download): PCA of area thumbnails (8x8 by default), fitted on the
  training images; its mean and components are kept in the domain's config.
- "dinov2:<folder>": the CLS embedding of a DINOv2 model (Oquab et al. 2023) loaded with Hugging Face
  transformers from a local folder (`save_pretrained`'s layout; nothing is downloaded). The DDM paper
  clusters DINOv2 features. Images are resized to the model's input side (at most 224, DINOv2's
  evaluation size), grey repeated to RGB, and normalized with ImageNet's mean and spread.
- "module:function": a user's extractor, taking uint8 images [N, H, W, C] and returning [N, F]
  (a timm or torchvision model with weights on the user's disk, say).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA

from archipelago.domains.images import data

Extractor = Callable[[np.ndarray], np.ndarray]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINO_SIDE = 224  # DINOv2's evaluation resolution (its position embeddings interpolate to it)


def fit_pca(pixels: np.ndarray, side: int, components: int) -> dict[str, Any]:
    """The PCA of thumbnails of the training images, as config entries (`pca_mean`, `pca_components`)."""
    thumbnails = data.downsampled(pixels, side)
    pca = PCA(n_components=min(components, *thumbnails.shape), random_state=0).fit(thumbnails)
    return {"pca_mean": pca.mean_.tolist(), "pca_components": pca.components_.tolist()}


def pca_features(pixels: np.ndarray, side: int, mean: list[float], components: list[list[float]]) -> np.ndarray:
    """Thumbnails projected on the fitted components: [N, components]."""
    return (data.downsampled(pixels, side) - np.asarray(mean)) @ np.asarray(components).T


def extractor(reference: str) -> Extractor:
    """The extractor a `features` setting names ("dinov2:<folder>" or "module:function")."""
    kind, _, rest = reference.partition(":")
    if kind == "dinov2" and rest:
        return Dinov2Features(rest)
    if not kind or not rest:
        raise ValueError(f"features={reference!r}: use 'pca', 'dinov2:<local folder>' or 'module:function' (a "
                         f"function of uint8 [N, H, W, C] images returning [N, F] features)")
    try:
        return getattr(importlib.import_module(kind), rest)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import the feature extractor {reference!r}: {error}") from error


class Dinov2Features:
    """DINOv2's CLS embeddings of uint8 images [N, H, W, C] -> [N, hidden], in batches, on the CPU or CUDA."""

    def __init__(self, folder: str, batch_size: int = 64):
        try:
            from transformers import AutoModel
        except ImportError as error:
            raise ImportError("features='dinov2:...' needs Hugging Face transformers: pip install transformers") \
                from error
        try:
            self.model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load a DINOv2 model from {folder!r} (a local folder saved with "
                             f"save_pretrained, weights in safetensors): {error}") from error
        self.side = min(int(self.model.config.image_size), DINO_SIDE)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = self.model.to(device)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        out = []
        for start in range(0, len(pixels), self.batch_size):
            x = (data.to_unit(pixels[start:start + self.batch_size]).to(device) + 1) / 2  # [B, C, H, W] in [0, 1]
            x = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(self.side, self.side),
                                                mode="bicubic", antialias=True, align_corners=False)
            out.append(model(pixel_values=(x - mean) / std).pooler_output.double().cpu())  # [B, hidden]
        return torch.cat(out).numpy()
