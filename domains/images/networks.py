"""Networks of the image domain: diffusers' UNet and DiT as velocity denoisers, a small router CNN, and
the latent stage on diffusers' `AutoencoderKL`.

Denoisers are diffusers models behind our calling convention `forward(x_t: Batch, t: [B])`: t in [0, 1]
is passed as t * 1000 (the range their sinusoidal embeddings were designed for), the output is the
velocity eps - x_0 of the field (DESIGN.md), and the class condition is an embedding table with one row
more than the classes: the null class that classifier-free guidance samples with (Ho & Salimans 2022).
Presets are literal dicts, from "tiny" (tests) to the published sizes (DDPM's CIFAR-10 UNet, DiT-B/2
and DiT-XL/2 of the DDM paper).

The codec is a KL autoencoder (Rombach et al. 2022) trained on the run's images, or a user's pretrained
one loaded from a local folder. Latents are scaled to about unit variance, as latent diffusion scales
them: a pretrained autoencoder's `scaling_factor` is used as it is; an autoencoder trained in the run
estimates 1 / std of its latents while it trains (a running average, as batch norm keeps its
statistics), saved with its weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding
from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor, nn

from archipelago.experts.conditions import Condition
from archipelago.experts.embeddings import ConditionEmbedding, TimestepEmbedder

FIELD = "image"  # the pixel field, [B, C, H, W] in [-1, 1]
LATENT = "latent"  # the latent field, [B, latent channels, H / f, W / f]
TIME_SCALE = 1000.0  # t in [0, 1] as the diffusers timestep range

UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
             "down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D")},
    "small": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16,
              "attention_head_dim": 16, "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
              "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")},
    "base": {"block_out_channels": (64, 128, 128), "layers_per_block": 2, "norm_num_groups": 32,
             "attention_head_dim": 32, "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
             "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")},
    # DDPM's CIFAR-10 network (Ho et al. 2020, 35.7M parameters): attention at 16x16.
    "ddpm-cifar10": {"block_out_channels": (128, 256, 256, 256), "layers_per_block": 2, "norm_num_groups": 32,
                     "attention_head_dim": 64, "dropout": 0.1,
                     "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                     "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")},
}
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "patch_size": 2},
    "small": {"num_layers": 6, "num_attention_heads": 4, "attention_head_dim": 32, "patch_size": 2},
    "S/2": {"num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64, "patch_size": 2},
    "B/2": {"num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64, "patch_size": 2},
    "XL/2": {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72, "patch_size": 2},  # the DDM paper's
}
AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {  # each halves the side len(block_out_channels) - 1 times
    "tiny": {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8},
    "small": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16},
    "sd": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
}


@dataclass(frozen=True)
class ImageNetConfig:
    """What every image network is built from: the diffused tensor's shape and the conditions."""

    channels: int  # of the diffused field (image channels, or latent channels)
    height: int
    width: int
    field: str = FIELD  # the batch key of the diffused tensor
    conditions: tuple[Condition, ...] = ()  # sorted by name; the denoisers take one categorical class


def _preset(presets: Mapping[str, dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    if name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; presets: {sorted(presets)}")
    return dict(presets[name])


def _class_condition(conditions: tuple[Condition, ...]) -> Condition | None:
    """The one categorical condition the diffusers denoisers embed (their class-label input)."""
    if not conditions:
        return None
    if len(conditions) > 1 or not conditions[0].categorical:
        raise ValueError(f"the image denoisers take one categorical condition (a class); got "
                         f"{[c.name for c in conditions]}")
    return conditions[0]


def _check_downsampling(config: ImageNetConfig, factor: int, what: str) -> None:
    if config.height % factor or config.width % factor:
        raise ValueError(f"{what} halves the image side {factor.bit_length() - 1} times: {config.height}x"
                         f"{config.width} is not divisible by {factor}; choose another size or preset")


class UNetDenoiser(nn.Module):
    """diffusers' `UNet2DModel` predicting the velocity of the field, class-conditional with a null class."""

    def __init__(self, config: ImageNetConfig, preset: str = "small", **overrides: Any):
        super().__init__()
        options = _preset(UNET_PRESETS, preset, "UNet") | overrides
        _check_downsampling(config, 2 ** (len(options["block_out_channels"]) - 1), f"UNet preset {preset!r}")
        self.field, self.condition = config.field, _class_condition(config.conditions)
        classes = len(self.condition.classes) + 1 if self.condition else None
        self.net = UNet2DModel(sample_size=(config.height, config.width), in_channels=config.channels,
                               out_channels=config.channels, num_class_embeds=classes, **options)

    def forward(self, x_t: dict[str, Tensor], t: Tensor) -> dict[str, Tensor]:
        labels = x_t[self.condition.name].long() if self.condition else None
        return {self.field: self.net(x_t[self.field], t * TIME_SCALE, class_labels=labels).sample}


class DiTDenoiser(nn.Module):
    """diffusers' `DiTTransformer2DModel` (Peebles & Xie 2023) predicting the velocity of the field. Without
    a class condition every sample carries the null label."""

    def __init__(self, config: ImageNetConfig, preset: str = "small", **overrides: Any):
        super().__init__()
        options = _preset(DIT_PRESETS, preset, "DiT") | overrides
        if config.height != config.width:
            raise ValueError(f"the DiT denoiser takes square inputs; got {config.height}x{config.width}")
        _check_downsampling(config, options["patch_size"], f"DiT preset {preset!r} (its patch size)")
        self.field, self.condition = config.field, _class_condition(config.conditions)
        self.classes = len(self.condition.classes) if self.condition else 1
        self.net = DiTTransformer2DModel(sample_size=config.height, in_channels=config.channels,
                                         out_channels=config.channels, num_embeds_ada_norm=self.classes,
                                         norm_num_groups=1, **options)
        for module in self.net.modules():
            if isinstance(module, LabelEmbedding):
                # Its table keeps the null row; conditions are dropped by our training with its seeded
                # generator, not by diffusers' dropout on the global random stream.
                module.dropout_prob = 0.0

    def forward(self, x_t: dict[str, Tensor], t: Tensor) -> dict[str, Tensor]:
        x = x_t[self.field]
        if self.condition:
            labels = x_t[self.condition.name].long()
        else:
            labels = torch.full((len(x),), self.classes, dtype=torch.long, device=x.device)  # the null row
        return {self.field: self.net(x, timestep=t * TIME_SCALE, class_labels=labels).sample}


DENOISERS: dict[str, type[nn.Module]] = {"unet": UNetDenoiser, "dit": DiTDenoiser}


class RouterCNN(nn.Module):
    """The router backbone: a small time-conditioned ResNet (diffusers' `ResnetBlock2D`, each halving the
    side) classifying x_t into K clusters; it also sees the conditions. [B, C, H, W], [B] -> logits [B, K]."""

    def __init__(self, config: ImageNetConfig, experts: int, width: int = 32, depth: int = 2):
        super().__init__()
        self.field = config.field
        self.time = TimestepEmbedder(width * 4)
        self.conditions = ConditionEmbedding(config.conditions, width * 4)
        self.stem = nn.Conv2d(config.channels, width, 3, padding=1)
        widths = [width * min(2**i, 4) for i in range(depth + 1)]
        self.blocks = nn.ModuleList(
            ResnetBlock2D(in_channels=a, out_channels=b, temb_channels=width * 4, groups=min(8, a),
                          groups_out=min(8, b), down=True) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.head = nn.Sequential(nn.GroupNorm(min(8, widths[-1]), widths[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(widths[-1], experts))

    def forward(self, x_t: dict[str, Tensor], t: Tensor) -> Tensor:
        x = x_t[self.field]
        c = self.time(t) + self.conditions(x_t, len(x), x.device)  # [B, 4W]
        h = self.stem(x)  # [B, W, H, W']
        for block in self.blocks:
            h = block(h, c)  # each halves the side
        return self.head(h)  # [B, K]


class LatentCodec(nn.Module):
    """The latent stage: `encode` maps `image` [B, C, H, W] in [-1, 1] to `latent` (the posterior mean,
    scaled), `decode` maps back, `loss` trains it (reconstruction MSE plus `kl_weight` times the KL to a
    standard normal, per element). `estimate_scale`: keep a running estimate of 1 / std of the latents
    as the scale (an autoencoder trained in the run); otherwise the scale stays as given."""

    inputs = (FIELD,)

    def __init__(self, autoencoder: AutoencoderKL, scale: float, kl_weight: float = 1e-6,
                 estimate_scale: bool = True, momentum: float = 0.02):
        super().__init__()
        self.autoencoder, self.kl_weight = autoencoder, kl_weight
        self.estimate_scale, self.momentum = estimate_scale, momentum
        # A parameter without gradient rather than a buffer: checkpoints keep the EMA of parameters only.
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=False)

    def encode(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        posterior = self.autoencoder.encode(batch[FIELD]).latent_dist
        return {LATENT: posterior.mean * self.scale}

    def decode(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {FIELD: self.autoencoder.decode(latents[LATENT] / self.scale).sample}

    def loss(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        x = batch[FIELD]
        posterior = self.autoencoder.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        reconstruction = self.autoencoder.decode(z).sample
        if self.estimate_scale:
            with torch.no_grad():
                target = 1.0 / posterior.mean.std().clamp_min(1e-6)
                self.scale.lerp_(target, self.momentum)
        kl = posterior.kl().sum() / x.numel()  # per element, as the reconstruction term
        return nn.functional.mse_loss(reconstruction, x) + self.kl_weight * kl


def autoencoder_preset(name: str) -> dict[str, Any]:
    """The options of an autoencoder preset (AUTOENCODER_PRESETS), or an error naming the presets."""
    return _preset(AUTOENCODER_PRESETS, name, "autoencoder")


def latent_shape(options: Mapping[str, Any], height: int, width: int) -> tuple[int, int, int]:
    """(channels, height, width) of the latents of an AutoencoderKL config (block_out_channels, latent_channels):
    each block after the first halves the side."""
    factor = 2 ** (len(options["block_out_channels"]) - 1)
    return int(options["latent_channels"]), height // factor, width // factor


def autoencoder(channels: int, height: int, width: int, preset: str, latent_channels: int) -> AutoencoderKL:
    """A fresh KL autoencoder of a preset for images of this shape."""
    options = autoencoder_preset(preset)
    blocks = len(options["block_out_channels"])
    _check_downsampling(ImageNetConfig(channels, height, width), 2 ** (blocks - 1), f"autoencoder preset {preset!r}")
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=max(height, width), **options)


def pretrained_autoencoder(path: str, channels: int, latent_channels: int | None) -> AutoencoderKL:
    """A user's pretrained `AutoencoderKL` from a local folder (`save_pretrained`'s layout, weights in
    safetensors: a pickled .bin is refused, never unpickled), checked against the images' channels and
    the latent channels the run asks for."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"autoencoder {path!r} is not a folder (a diffusers AutoencoderKL saved with "
                                f"save_pretrained, with config.json and the weights in safetensors)")
    try:
        model = AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load an AutoencoderKL from {path!r}: {error}") from error
    if model.config.in_channels != channels:
        raise ValueError(f"autoencoder {path!r} encodes {model.config.in_channels}-channel images; the data has "
                         f"{channels} channel(s): set the image domain's channels={model.config.in_channels}")
    if latent_channels is not None and model.config.latent_channels != latent_channels:
        raise ValueError(f"autoencoder {path!r} has {model.config.latent_channels} latent channels; the denoiser "
                         f"is configured for latent_channels={latent_channels}: drop that setting or make them agree")
    return model
