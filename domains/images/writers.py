"""Writing images: PIL images, folders of PNG files that `io.read_images` reads back, and sample grids.

`write_pngs` lays labelled images out as class folders (`<folder>/<label>/<id>.png`), the layout the
folder reader takes labels from; every file is encoded in memory and written atomically by
`experts.storage.write_bytes`, so a failure leaves no half-written file.
"""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from archipelago.domains.images import data
from archipelago.domains.images.io import IMAGE_SUFFIXES, Images
from archipelago.experts import storage


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """uint8 [N, H, W, C] as PIL images: mode "L" for C = 1, "RGB" for C = 3."""
    data.check_pixels(pixels, "to_pil")
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]


def write_pngs(images: Images, folder: str | os.PathLike) -> list[Path]:
    """One PNG per image, `folder/<label>/<id>.png` when the images have labels, else `folder/<id>.png`;
    returns the paths in the images' order. Ids and labels are made file-name safe (other characters as
    "_", a repeated name numbered), files of the same name are overwritten."""
    folder = Path(folder)
    if images.labels is None:
        subfolders = [""] * len(images)
    else:
        unlabelled = [i for i, label in zip(images.ids, images.labels, strict=True) if label is None]
        if unlabelled:
            raise ValueError(f"images {unlabelled[:5]} have no label while others do: class folders need a label "
                             "for every image")
        subfolders = [_safe(label) for label in images.labels]
    paths = [folder / sub / f"{name}.png" for sub, name in _unique_names(images.ids, subfolders)]
    for path, image in zip(paths, to_pil(images.pixels), strict=True):
        encoded = io.BytesIO()
        image.save(encoded, format="PNG")
        storage.write_bytes(str(path), encoded.getvalue())
    return paths


def _safe(name: str) -> str:
    """A file-name-safe version of a name: characters other than letters, digits, ".", "_" and "-" as "_";
    never hidden, never empty."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return "_" + safe[1:] if safe.startswith(".") else safe or "_"


def _unique_names(ids: list[str], subfolders: list[str]) -> list[tuple[str, str]]:
    """(sub-folder, file stem) per image: the id without an image suffix, made safe, numbered when repeated
    in its sub-folder (compared without case, for case-insensitive file systems)."""
    taken: set[tuple[str, str]] = set()
    out = []
    for image_id, sub in zip(ids, subfolders, strict=True):
        stem = image_id[: -len(Path(image_id).suffix)] if Path(image_id).suffix.lower() in IMAGE_SUFFIXES else image_id
        base = name = _safe(stem)
        count = 1
        while (sub.lower(), name.lower()) in taken:
            count += 1
            name = f"{base}-{count}"
        taken.add((sub.lower(), name.lower()))
        out.append((sub, name))
    return out


def grid(pixels: np.ndarray, columns: int | None = None, padding: int = 2) -> Image.Image:
    """The images uint8 [N, H, W, C] tiled row by row, `columns` wide (default ceil(sqrt(N))), with
    `padding` pixels of value 0 between tiles."""
    data.check_pixels(pixels, "grid")
    n, h, w, c = pixels.shape
    if n == 0:
        raise ValueError("grid needs at least one image")
    columns = math.ceil(math.sqrt(n)) if columns is None else columns
    if columns < 1 or padding < 0:
        raise ValueError(f"grid: columns must be >= 1 and padding >= 0; got columns={columns}, padding={padding}")
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * h + (rows - 1) * padding, columns * w + (columns - 1) * padding, c), np.uint8)
    for i, tile in enumerate(pixels):
        top, left = (i // columns) * (h + padding), (i % columns) * (w + padding)
        canvas[top:top + h, left:left + w] = tile
    return to_pil(canvas[None])[0]
