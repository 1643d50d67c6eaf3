"""Image records: `Images` as Arrow rows and back, pixels as model tensors, and area thumbnails.

A record is one image:

- `id` (string): the source's name for the image (see `archipelago.domains.images.io.Images`);
- `pixels` (binary): the image's raw uint8 bytes, row-major [H, W, C];
- `label` (string, nullable): its class name; the column is present only when the images have labels.

The shape [H, W, C] shared by every row is the schema metadata `archipelago.image_shape` (JSON), so a
table, or a Parquet file written from it, reads back without decoding. Tensors are [N, C, H, W] in
[-1, 1], the range the Gaussian path of the image domain works in.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from archipelago.domains.images import io as image_io

SHAPE_KEY = b"archipelago.image_shape"
_THUMBNAIL_CHUNK = 1024  # images pooled at a time: bounds the float copy of large blocks


def images_to_table(images: image_io.Images) -> pa.Table:
    """Records of `images`, one row per image, with the shape in the schema metadata."""
    n, h, w, c = images.pixels.shape
    size = h * w * c
    large = n * size >= 2**31  # binary offsets are int32
    offsets = (np.arange(n + 1, dtype=np.int64) * size).astype(np.int64 if large else np.int32)
    pixels = pa.Array.from_buffers(pa.large_binary() if large else pa.binary(), n,
                                   [None, pa.py_buffer(offsets), pa.py_buffer(images.pixels.tobytes())])
    columns = {"id": pa.array(images.ids, pa.string()), "pixels": pixels}
    if images.labels is not None:
        columns["label"] = pa.array(images.labels, pa.string())
    return pa.table(columns).replace_schema_metadata({SHAPE_KEY: json.dumps([h, w, c]).encode()})


def image_shape(table: pa.Table | pa.Schema) -> tuple[int, int, int]:
    """(H, W, C) of the images of a records table, from its schema metadata."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    raw = (schema.metadata or {}).get(SHAPE_KEY)
    if raw is None:
        raise ValueError(f"not an image records table: no {SHAPE_KEY.decode()!r} in the schema metadata "
                         f"(columns: {schema.names})")
    try:
        shape = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"image records metadata {SHAPE_KEY.decode()!r} is not JSON: {raw!r}") from error
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)
            and shape[2] in (1, 3)):
        raise ValueError(f"image records metadata {SHAPE_KEY.decode()!r} must be [H, W, C] with C in (1, 3); "
                         f"got {shape!r}")
    return shape[0], shape[1], shape[2]


def table_to_images(table: pa.Table) -> image_io.Images:
    """The images of a records table, copied out of Arrow's memory."""
    for name in ("id", "pixels"):
        if name not in table.column_names:
            raise ValueError(f"not an image records table: no {name!r} column (columns: {table.column_names})")
    h, w, c = image_shape(table)
    ids = [str(v) for v in table.column("id").to_pylist()]
    flat = _pixel_bytes(table.column("pixels"), h * w * c, ids)
    labels = table.column("label").to_pylist() if "label" in table.column_names else None
    return image_io.Images(flat.reshape(len(ids), h, w, c).copy(), ids, labels)


def _pixel_bytes(column: pa.ChunkedArray, size: int, ids: list[str]) -> np.ndarray:
    """The concatenated bytes of a binary column whose every row holds `size` bytes."""
    array = column.combine_chunks()
    if not (pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
        raise ValueError(f"image records: the pixels column has type {array.type}; expected binary")
    if array.null_count:
        missing = [ids[i] for i in np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[:5]]
        raise ValueError(f"image records: {array.null_count} rows have no pixels (null), e.g. {missing}")
    if len(array) == 0:
        return np.zeros(0, dtype=np.uint8)
    offset_type = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], dtype=offset_type)[array.offset:array.offset + len(array) + 1]
    odd = np.flatnonzero(np.diff(offsets) != size)
    if len(odd):
        examples = ", ".join(f"{ids[i]} ({offsets[i + 1] - offsets[i]})" for i in odd[:5])
        raise ValueError(f"image records: {len(odd)} rows do not hold H*W*C = {size} bytes: {examples}")
    return np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]


def concat_tables(tables: list[pa.Table]) -> pa.Table:
    """Records tables as one, with their shape metadata; every table must hold images of one shape."""
    if not tables:
        raise ValueError("concat_tables needs at least one records table")
    shapes = [image_shape(t) for t in tables]
    if len(set(shapes)) > 1:
        raise ValueError(f"records tables hold images of different shapes (H, W, C): {sorted(set(shapes))}")
    return pa.concat_tables(tables, promote_options="permissive").replace_schema_metadata(tables[0].schema.metadata)


def to_unit(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] as float32 [N, C, H, W] in [-1, 1]: x / 127.5 - 1."""
    check_pixels(pixels, "to_unit")
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def from_unit(x: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] (clamped) as uint8 [N, H, W, C], rounded: the inverse of `to_unit`."""
    if x.ndim != 4:
        raise ValueError(f"from_unit takes images [N, C, H, W]; got shape {tuple(x.shape)}")
    scaled = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def downsampled(pixels: np.ndarray, side: int = 8) -> np.ndarray:
    """Area thumbnails side x side in [0, 1], flattened as [side, side, C]: float32 [N, side * side * C]."""
    check_pixels(pixels, "downsampled")
    if side < 1:
        raise ValueError(f"downsampled: side must be a positive int; got {side}")
    chunks = []
    for start in range(0, len(pixels), _THUMBNAIL_CHUNK):
        chunk = np.ascontiguousarray(pixels[start:start + _THUMBNAIL_CHUNK])
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div_(255.0)  # [n, C, H, W] in [0, 1]
        pooled = F.adaptive_avg_pool2d(x, side)  # [n, C, side, side]
        chunks.append(pooled.permute(0, 2, 3, 1).reshape(len(x), -1).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, side * side * pixels.shape[-1]), np.float32)


def check_pixels(pixels: np.ndarray, caller: str) -> None:
    """A ValueError naming `caller` unless `pixels` are uint8 [N, H, W, C] with C in (1, 3)."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4 \
            or pixels.shape[-1] not in (1, 3):
        raise ValueError(f"{caller} takes uint8 [N, H, W, C] with C in (1, 3); got {type(pixels).__name__} "
                         f"{getattr(pixels, 'dtype', '')} {getattr(pixels, 'shape', '')}")
