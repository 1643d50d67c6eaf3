"""Normalizing single images: any decoded image or array to uint8 [H, W, C] of one format.

`_Reader` decodes paths, encoded bytes and PIL images, and takes arrays (uint8, uint16 or float in [0, 1],
C in 1..4), bringing each image to the channels and size of an `ImageFormat` and counting each
normalization in a `ReadReport`; an image PIL cannot decode is dropped with its reason. These types and
`Images`, the blocks it yields, are defined here so that `io`, which reads the sources, imports this module
and not the reverse; `io` re-exports them.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FITS = ("crop", "resize", "pad")
_SHOWN_IDS = 5
_SHOWN_FILES = 3


@dataclass(frozen=True)
class Images:
    """A block of images with their ids and, when the source has them, their class names."""

    pixels: np.ndarray  # uint8 [N, H, W, C], C in {1, 3}
    ids: list[str]  # one per image: a file's path relative to the folder, "<stem>-<i>", a Parquet id
    labels: list[str | None] | None  # the class name per image; None when the source has no labels

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, np.ndarray) or p.dtype != np.uint8 or p.ndim != 4 or p.shape[-1] not in (1, 3):
            shape = getattr(p, "shape", None)
            raise ValueError(f"Images.pixels must be uint8 [N, H, W, C] with C in (1, 3); got {type(p).__name__} "
                             f"{getattr(p, 'dtype', '')} {shape}")
        if len(self.ids) != len(p):
            raise ValueError(f"Images has {len(self.ids)} ids for {len(p)} images")
        if self.labels is not None and len(self.labels) != len(p):
            raise ValueError(f"Images has {len(self.labels)} labels for {len(p)} images")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ImageFormat:
    """The format every image is brought to."""

    size: tuple[int, int] | None = None  # (height, width); None: the first image's, any other size an error
    channels: int | None = None  # 1 (grey) or 3 (RGB); None: the first image's (grey -> 1, anything else -> 3)
    # how an image of another size reaches `size`: "crop" resizes the shorter side to fit, then crops the centre
    # (as ADM and DiT prepare ImageNet); "resize" stretches; "pad" downscales to fit inside, keeping the aspect
    # ratio, then pads the centre with zeros
    fit: Literal["crop", "resize", "pad"] = "crop"
    background: int = 255  # the grey level images with alpha are composited over (white)

    def __post_init__(self) -> None:
        if self.size is not None:
            size = tuple(self.size)
            if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
                raise ValueError(f"ImageFormat.size must be (height, width) as two positive ints; got {self.size!r}")
            object.__setattr__(self, "size", size)
        if self.channels not in (None, 1, 3):
            raise ValueError(f"ImageFormat.channels must be None, 1 (grey) or 3 (RGB); got {self.channels!r}")
        if self.fit not in FITS:
            raise ValueError(f"ImageFormat.fit must be one of {FITS}; got {self.fit!r}")
        if isinstance(self.background, bool) or not isinstance(self.background, int) or not 0 <= self.background <= 255:
            raise ValueError(f"ImageFormat.background must be a grey level 0..255; got {self.background!r}")


@dataclass
class ReadReport:
    """What a read saw: the images, the ones dropped (id, reason) and each normalization with its count."""

    total: int = 0  # images seen, dropped ones included
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    normalized: Counter[str] = field(default_factory=Counter)  # e.g. "RGBA -> RGB (alpha over 255)": 3
    source: str = ""  # what was read, for messages

    def log(self, logger: logging.Logger) -> None:
        """One info line per normalization with its count, one warning summarizing the drops."""
        for what, count in sorted(self.normalized.items()):
            logger.info("images from %s: %s: %d", self.source or "the source", what, count)
        if self.dropped:
            logger.warning("dropped %d of %d images from %s: %s", len(self.dropped), self.total,
                        self.source or "the source", _reasons(self.dropped))


# --------------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------------


class _Reader:
    """Decodes and normalizes images to one format; the first image fixes what the format leaves open."""

    def __init__(self, fmt: ImageFormat, report: ReadReport, where: str, block_rows: int) -> None:
        self.fmt, self.report, self.where, self.block_rows = fmt, report, where, block_rows
        self.size = fmt.size
        self.channels = fmt.channels
        self.sizes: Counter[tuple[int, int]] = Counter()  # (H, W) of every image seen when fmt.size is None
        self.odd: list[str] = []  # ids of the images whose size differs from the first one's

    def arrays_of(self, images: Images) -> Iterator[Images]:
        return self.arrays(images.pixels, images.ids, images.labels)

    def arrays(self, pixels: np.ndarray, ids: list[str], labels: list[str | None] | None) -> Iterator[Images]:
        """Normalize an array [N, H, W, C] block by block, vectorised where it needs no resizing."""
        for start in range(0, len(pixels), self.block_rows):
            rows = slice(start, start + self.block_rows)
            self.report.total += len(ids[rows])
            counts: Counter[str] = Counter()
            out = self._normalize(np.asarray(pixels[rows]), ids[rows], counts, self.where)
            self._check_sizes()
            self.report.normalized.update(counts)
            yield Images(np.array(out, copy=True), list(ids[rows]), None if labels is None else list(labels[rows]))

    def encoded(self, items: list[Any], ids: list[str], labels: list[str | None] | None) -> Iterator[Images]:
        """Decode and normalize images given as paths, encoded bytes or PIL images, block by block."""
        for start in range(0, len(items), self.block_rows):
            rows = slice(start, start + self.block_rows)
            kept = [(pixels, i) for i, pixels in enumerate(map(self._one, items[rows], ids[rows]), start)
                    if pixels is not None]
            self._check_sizes()
            if kept:
                yield Images(np.stack([p for p, _ in kept]), [ids[i] for _, i in kept],
                             None if labels is None else [labels[i] for _, i in kept])

    def _one(self, item: Any, image_id: str) -> np.ndarray | None:
        """One image normalized to [H, W, C], or None when it is dropped (counted in the report)."""
        self.report.total += 1
        counts: Counter[str] = Counter()
        try:
            pixels = _decode(item, counts)
        except _Unusable as error:
            self.report.dropped.append((image_id, str(error)))
            return None
        out = self._normalize(pixels[None], [image_id], counts, image_id)
        if out is None:
            return None
        self.report.normalized.update(counts)
        return out[0]

    def _normalize(self, x: np.ndarray, ids: list[str], counts: Counter[str], where: str) -> np.ndarray | None:
        """uint8 [n, h, w, c] in the format from [n, H, W, C] (uint8, uint16 or float, C in 1..4); None when the
        size differs from the first image's and no size is set (the error is raised after the block)."""
        x = _eight_bit(x, counts, where)
        x = _opaque(x, self.fmt.background, counts)
        if self.channels is None:
            self.channels = 1 if x.shape[-1] == 1 else 3
        x = _to_channels(x, self.channels, counts)
        return self._sized(x, ids, counts)

    def _sized(self, x: np.ndarray, ids: list[str], counts: Counter[str]) -> np.ndarray | None:
        h, w = x.shape[1:3]
        if self.fmt.size is None:
            self.size = self.size or (h, w)
            self.sizes[h, w] += len(x)
            if (h, w) != self.size:
                self.odd.extend(ids[: _SHOWN_FILES - len(self.odd)])
                return None
            return x
        if (h, w) == self.size:
            return x
        target_h, target_w = self.size
        counts[f"{w}x{h} -> {target_w}x{target_h} ({self.fmt.fit})"] += len(x)
        return np.stack([_fit(image, self.size, self.fmt.fit) for image in x])

    def _check_sizes(self) -> None:
        if not self.odd:
            return
        h, w = self.size
        sizes = ", ".join(f"{sw}x{sh}: {n}" for (sh, sw), n in self.sizes.most_common())
        raise ValueError(f"{self.where}: images differ in size (width x height: count so far) {sizes}; the first is "
                         f"{w}x{h}, {_first(self.odd, _SHOWN_FILES)} are not. Set ImageFormat(size=({h}, {w}), "
                         f"fit='crop' | 'resize' | 'pad') to bring every image to one size")


class _Unusable(Exception):
    """An image that cannot be used; the message is the reason it is dropped."""


def _decode(item: Any, counts: Counter[str]) -> np.ndarray:
    """Raw pixels [H, W, C] of a path, encoded bytes or PIL image; PIL's errors become `_Unusable`."""
    if item is None:
        raise _Unusable("no image bytes (null)")
    try:
        if isinstance(item, Image.Image):
            item.load()
            return _pil_pixels(item, counts)
        with Image.open(item if isinstance(item, Path) else BytesIO(item)) as image:
            if getattr(image, "n_frames", 1) > 1:
                counts["multi-frame -> first frame"] += 1
            image.load()
            return _pil_pixels(image, counts)
    except UnidentifiedImageError as error:
        raise _Unusable("not an image file PIL can identify") from error
    except Image.DecompressionBombError as error:
        raise _Unusable("decompression bomb: more pixels than PIL's MAX_IMAGE_PIXELS allows") from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        # "image file is truncated (150 bytes not processed)": the details are left out so that reasons group
        message = re.sub(r" \(.*\)$", "", str(error))
        raise _Unusable(f"cannot decode ({type(error).__name__}): {message}") from error


def _pil_pixels(image: Image.Image, counts: Counter[str]) -> np.ndarray:
    """A PIL image as raw pixels [H, W, C]: uint8 grey (1), grey + alpha (2), RGB (3) or RGBA (4), uint16
    16-bit grey, or float32 grey in [0, 1]."""
    mode = image.mode
    if image.width == 0 or image.height == 0:
        raise _Unusable("empty image (0 pixels)")
    if mode in ("L", "LA", "RGB", "RGBA"):
        x = np.asarray(image)
    elif mode.startswith("I;16"):
        x = np.asarray(image).astype(np.uint16)
    elif mode == "I":
        x = _int_pixels(np.asarray(image), counts)
    elif mode == "F":
        x = np.asarray(image)
        if not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise _Unusable("mode F values outside [0, 1]")
    else:
        target = {"1": "L", "P": "RGBA" if "transparency" in image.info else "RGB", "PA": "RGBA",
                  "La": "LA"}.get(mode, "RGB")
        name = {"1": "1-bit", "P": "palette"}.get(mode, mode)
        counts[f"{name} -> {'grey' if target == 'L' else target}"] += 1
        x = np.asarray(image.convert(target))
    return x if x.ndim == 3 else x[..., None]


def _int_pixels(x: np.ndarray, counts: Counter[str]) -> np.ndarray:
    """Mode "I": 16-bit grey when a value exceeds 255, else 8-bit values stored in 32 bits."""
    low, high = int(x.min()), int(x.max())
    if low < 0 or high > 65535:
        raise _Unusable("mode I values outside 0..65535")
    if high > 255:
        return x.astype(np.uint16)
    counts["32-bit integer -> 8-bit"] += 1
    return x.astype(np.uint8)


def _eight_bit(x: np.ndarray, counts: Counter[str], where: str) -> np.ndarray:
    """uint8 pixels: 16-bit values scaled by 255 / 65535, floats in [0, 1] by 255, rounded."""
    if x.dtype.kind == "u" and x.dtype.itemsize == 1:
        return x
    if x.dtype.kind == "u" and x.dtype.itemsize == 2:
        counts["16-bit -> 8-bit"] += len(x)
        return ((x.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= 1):
        raise ValueError(f"{where}: float pixels must lie in [0, 1]; found min {low}, max {high}")
    counts["float [0, 1] -> 8-bit"] += len(x)
    return np.floor(x.astype(np.float64) * 255 + 0.5).astype(np.uint8)


def _opaque(x: np.ndarray, background: int, counts: Counter[str]) -> np.ndarray:
    """Grey + alpha or RGBA composited over a grey `background`: c a / 255 + background (255 - a) / 255."""
    if x.shape[-1] not in (2, 4):
        return x
    counts[f"{'LA -> grey' if x.shape[-1] == 2 else 'RGBA -> RGB'} (alpha over {background})"] += len(x)
    color, alpha = x[..., :-1].astype(np.uint32), x[..., -1:].astype(np.uint32)
    return ((color * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8)


def _to_channels(x: np.ndarray, channels: int, counts: Counter[str]) -> np.ndarray:
    """Grey repeated to RGB, or RGB to grey by ITU-R 601-2 luma with PIL's fixed-point weights (PIL's "L")."""
    if x.shape[-1] == channels:
        return x
    if channels == 3:
        counts["grey -> RGB"] += len(x)
        return np.repeat(x, 3, axis=-1)
    counts["RGB -> grey"] += len(x)
    rgb = x.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def _fit(pixels: np.ndarray, size: tuple[int, int], fit: str) -> np.ndarray:
    """One image [H, W, C] brought to `size` (height, width) by `fit`, with antialiased Lanczos resampling."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    h, w = size
    lanczos = Image.Resampling.LANCZOS
    if fit == "crop":
        out = ImageOps.fit(image, (w, h), method=lanczos)
    elif fit == "resize":
        out = image.resize((w, h), lanczos)
    else:
        inner = image if image.width <= w and image.height <= h else ImageOps.contain(image, (w, h), method=lanczos)
        out = Image.new(image.mode, (w, h), 0)
        out.paste(inner, ((w - inner.width) // 2, (h - inner.height) // 2))
    x = np.asarray(out)
    return x if x.ndim == 3 else x[..., None]


def _reasons(dropped: list[tuple[str, str]]) -> str:
    by_reason: dict[str, list[str]] = {}
    for image_id, reason in dropped:
        by_reason.setdefault(reason, []).append(image_id)
    return "; ".join(f"{reason}: {len(ids)} ({_first(ids, _SHOWN_IDS)})" for reason, ids in by_reason.items())


def _first(names: Sequence[str], n: int) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
