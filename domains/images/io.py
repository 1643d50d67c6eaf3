"""Reading images from every source, block by block, normalized to one format.

`read_images` turns a source into blocks of `Images` (uint8 [N, H, W, C], C in {1, 3}, the same H, W, C
in every block), decoding at most `block_rows` images at a time so that a Parquet source larger than
memory is read in pieces. Sources:

- a folder of image files (.png .jpg .jpeg .bmp .gif .tif .tiff .webp), sorted by relative path; when
  its sub-folders hold images, each sub-folder is a class named by the folder;
- one image file;
- an IDX file (`...-images-idx3-ubyte[.gz]`, the MNIST format), with the labels file beside it;
- a numpy array [N, H, W] or [N, H, W, C] (C in {1, 3, 4}; uint8, uint16 or float in [0, 1]), a `.npy`
  or `.npz` file, or a tuple (array, labels);
- a list of PIL images;
- Parquet (a file, a folder of `*.parquet` files, or a `pyarrow.Table`) with encoded image bytes in a
  binary column or in a Hugging Face `datasets` Image struct `{bytes, path}`, or our own records
  (`archipelago.domains.images.data`);
- `Images` itself.

Normalization (`normalize.py`) follows `ImageFormat`: PIL modes to grey or RGB, 16-bit to 8-bit, alpha
composited over a background, then the channel count, then the size (ADM's centre crop by default). Every
conversion is counted in a `ReadReport`; an image PIL cannot decode is dropped with its reason, never
half-read, and `check_dropped` turns too many drops into one error.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from archipelago.domains.images import data
from archipelago.domains.images.normalize import FITS as FITS
from archipelago.domains.images.normalize import ImageFormat as ImageFormat
from archipelago.domains.images.normalize import Images as Images
from archipelago.domains.images.normalize import ReadReport as ReadReport
from archipelago.domains.images.normalize import _first, _Reader, _reasons

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_IDX_IMAGES = re.compile(r"idx3-ubyte(\.gz)?$")
_IDX_OTHER = re.compile(r"idx\d-ubyte(\.gz)?$")
_IDX_UINT8 = 0x08
_SOURCES = ("a folder of images (one sub-folder per class) or of .parquet files, an image, IDX, .npy, .npz or "
            ".parquet file, a numpy array, a tuple (array, labels), a list of PIL images, a pyarrow Table or Images")
_DEFAULT_FORMAT = ImageFormat()


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_images(source: Any, fmt: ImageFormat = _DEFAULT_FORMAT, *, report: ReadReport | None = None,
                label_column: str = "label", image_column: str = "image", id_column: str | None = None,
                labels: Sequence | None = None, block_rows: int = 4096) -> Iterator[Images]:
    """Blocks of at most `block_rows` images from any source of the module docstring, in the source's order,
    normalized to `fmt`; every block has the same H, W and C.

    The source is checked before the first block is asked for: a missing path is a FileNotFoundError, an
    unknown source a TypeError, a malformed one (no images, a missing column, a bad IDX header) a
    ValueError naming it. `labels` gives the class names of an array, IDX file or list of PIL images (an
    IDX file's labels are otherwise read from the labels file beside it). Parquet sources read encoded
    images from `image_column`, class names from `label_column` when present and ids from `id_column` when
    given. Conversions and drops are counted in `report`; without one, they are logged at the end.
    """
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int; got {block_rows!r}")
    own = report is None
    report = ReadReport() if report is None else report
    where = _describe(source)
    report.source = report.source or where
    reader = _Reader(fmt, report, where, block_rows)
    columns = _Columns(image_column, label_column, id_column)
    blocks = _resolve(source, reader, columns, labels)
    return _stream(blocks, block_rows, report if own else None)


def _stream(blocks: Iterator[Images], block_rows: int, report: ReadReport | None) -> Iterator[Images]:
    yield from _reblock(blocks, block_rows)
    if report is not None:
        report.log(logger)


@dataclass(frozen=True)
class _Columns:
    image: str
    label: str
    id: str | None


def _resolve(source: Any, reader: _Reader, columns: _Columns, labels: Sequence | None) -> Iterator[Images]:
    """Check the source and return the generator of its blocks."""
    if isinstance(source, (str, os.PathLike)):
        return _resolve_path(Path(source), reader, columns, labels)
    if isinstance(source, Images):
        _no_labels_given(labels, "Images")
        return reader.arrays(source.pixels, source.ids, source.labels)
    if isinstance(source, np.ndarray):
        return _read_array(source, "array", reader, labels)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
        _no_labels_given(labels, "a tuple (array, labels)")
        return _read_array(source[0], "array", reader, source[1])
    if isinstance(source, pa.Table):
        _no_labels_given(labels, "a pyarrow Table")
        if _is_records(source.schema):
            return reader.arrays_of(data.table_to_images(source))
        _check_columns(source.schema, columns, "the table")
        batches = source.select(_wanted(source.schema, columns)).to_batches(max_chunksize=reader.block_rows)
        return _decode_batches(batches, "table", reader, columns)
    if isinstance(source, (list, tuple)) and source and all(isinstance(item, Image.Image) for item in source):
        names = [f"image-{i}" for i in range(len(source))]
        return reader.encoded(list(source), names, _as_labels(labels, len(source), "the list of PIL images"))
    if isinstance(source, (list, tuple)) and not source:
        raise ValueError("cannot read images from an empty list: pass a non-empty list of PIL images")
    raise TypeError(f"cannot read images from {type(source).__name__}: pass {_SOURCES}")


def _resolve_path(path: Path, reader: _Reader, columns: _Columns, labels: Sequence | None) -> Iterator[Images]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    name, suffix = path.name.lower(), path.suffix.lower()
    if path.is_dir():
        parquet = _parquet_files(path)
        if parquet:
            _no_labels_given(labels, f"the Parquet folder {path}")
            return _read_parquet(parquet, reader, columns)
        _no_labels_given(labels, f"the folder {path}")
        files, folder_labels = _folder_files(path)
        return reader.encoded(files, [f.relative_to(path).as_posix() for f in files], folder_labels)
    if _IDX_IMAGES.search(name):
        return _read_idx_images(path, reader, labels)
    if _IDX_OTHER.search(name):
        raise ValueError(f"{path}: an IDX labels (or other non-image) file; pass the images file "
                         "(...-images-idx3-ubyte[.gz]) as the source, its labels are found beside it")
    if suffix == ".npy":
        return _read_array(np.load(path, mmap_mode="r", allow_pickle=False), path.stem, reader, labels)
    if suffix == ".npz":
        return _read_npz(path, reader, labels)
    if suffix == ".parquet":
        _no_labels_given(labels, f"the Parquet file {path}")
        return _read_parquet([path], reader, columns)
    if suffix in IMAGE_SUFFIXES:
        return reader.encoded([path], [path.name], _as_labels(labels, 1, str(path)))
    raise ValueError(f"{path}: unknown file type {suffix or name!r}; pass {_SOURCES}")


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, np.ndarray):
        return f"an array {source.shape}"
    if isinstance(source, (list, tuple)):
        return f"a {type(source).__name__} of {len(source)}"
    return type(source).__name__


def _no_labels_given(labels: Sequence | None, what: str) -> None:
    if labels is not None:
        raise ValueError(f"labels= names the classes of an array, an IDX file or a list of PIL images; {what} "
                         "carries its own labels")


def _as_labels(values: Any, n: int, where: str) -> list[str | None] | None:
    """Class names as strings (None stays None), one per image; None when there are none."""
    if values is None:
        return None
    values = values.tolist() if isinstance(values, np.ndarray) else list(values)
    if len(values) != n:
        raise ValueError(f"{where}: {len(values)} labels for {n} images")
    return [None if v is None else str(v) for v in values]


# --- folders --------------------------------------------------------------------------------------


def _visible(folder: Path) -> list[Path]:
    # hidden entries (.DS_Store, editors' temporaries) are skipped; an unfinished write of `storage.write_bytes`
    # ends in ".tmp-<hex>", no image suffix, so it is never read either
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return [p for p in _visible(folder) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _parquet_files(folder: Path) -> list[Path]:
    """The folder's Parquet files when it holds no image files (then it is a Parquet source), else []."""
    entries = _visible(folder)
    parquet = [p for p in entries if p.is_file() and p.suffix.lower() == ".parquet"]
    if not parquet or _image_files(folder) or any(_image_files(d) for d in entries if d.is_dir()):
        return []
    return parquet


def _folder_files(folder: Path) -> tuple[list[Path], list[str | None] | None]:
    """The image files of a folder sorted by relative path, with their class names when it has class folders."""
    root = _image_files(folder)
    classes = {d: _image_files(d) for d in _visible(folder) if d.is_dir()}
    if not any(classes.values()):
        if not root:
            raise ValueError(f"{folder}: no image files (looked for {', '.join(IMAGE_SUFFIXES)}, in the folder and "
                             "in class sub-folders one level down) and no .parquet files")
        return root, None
    if root:
        raise ValueError(f"{folder} mixes unlabelled images with class folders: {_first([p.name for p in root], 3)} "
                         f"beside the folders {_first([d.name for d in classes], 3)}; move them into a class folder")
    empty = [d for d, files in classes.items() if not files]
    if empty:
        raise ValueError(f"class folder {empty[0]} holds no image files (looked for {', '.join(IMAGE_SUFFIXES)}); "
                         "every sub-folder of a folder with class folders is a class")
    labelled = sorted(((f, d.name) for d, files in classes.items() for f in files),
                      key=lambda pair: pair[0].relative_to(folder).as_posix())
    return [f for f, _ in labelled], [label for _, label in labelled]


# --- IDX ------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array of an IDX file (`.gz` or not) of unsigned bytes (dtype code 0x08), the MNIST format:
    two zero bytes, the dtype code, the number of dims, then each dim as a big-endian int32."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such IDX file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable gzip file ({error})") from error
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (it does not start with the magic: two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code != _IDX_UINT8:
        raise ValueError(f"{path}: unsupported IDX dtype code 0x{code:02X}; only 0x08 (unsigned byte) is supported")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX file: {len(raw)} bytes, its header of {ndim} dims needs {header}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    needed = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header < needed:
        raise ValueError(f"{path}: truncated IDX file: dims {list(dims)} need {needed} data bytes, it holds "
                         f"{len(raw) - header}")
    if len(raw) - header > needed:
        raise ValueError(f"{path}: {len(raw) - header - needed} bytes after the {needed} data bytes that dims "
                         f"{list(dims)} need: the header does not describe this file")
    return np.frombuffer(raw, dtype=np.uint8, count=needed, offset=header).reshape(dims)


def _read_idx_images(path: Path, reader: _Reader, labels: Sequence | None) -> Iterator[Images]:
    pixels = read_idx(path)
    stem = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    if labels is None:
        labels = _idx_labels(path, len(pixels))
    return _read_array(pixels, stem, reader, labels)


def _idx_labels(path: Path, n: int) -> list[str] | None:
    """The digits of the labels file beside an images file, or None when there is none."""
    if "images-idx3" not in path.name:
        return None
    labels_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    if not labels_path.exists():
        logger.info("%s: no labels file %s beside it; the images are unlabelled", path, labels_path.name)
        return None
    values = read_idx(labels_path)
    if values.ndim != 1 or len(values) != n:
        raise ValueError(f"{labels_path} holds {values.shape} labels but {path} holds {n} images")
    return [str(v) for v in values.tolist()]


# --- arrays ---------------------------------------------------------------------------------------


def _read_array(pixels: np.ndarray, stem: str, reader: _Reader, labels: Any) -> Iterator[Images]:
    where = f"{stem} {pixels.shape}"
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    if pixels.ndim != 4 or pixels.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{where}: images must be [N, H, W] (grey) or [N, H, W, C] with C in (1, 3, 4)")
    if not (pixels.dtype.kind == "u" and pixels.dtype.itemsize <= 2 or pixels.dtype.kind == "f"):
        raise ValueError(f"{where}: pixels of dtype {pixels.dtype}; expected uint8, uint16 or float in [0, 1]")
    ids = [f"{stem}-{i}" for i in range(len(pixels))]
    return reader.arrays(pixels, ids, _as_labels(labels, len(pixels), where))


def _read_npz(path: Path, reader: _Reader, labels: Sequence | None) -> Iterator[Images]:
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.keys())
        image_key = next((k for k in ("images", "x") if k in names), None)
        label_key = next((k for k in ("labels", "y") if k in names), None)
        if image_key is None:
            raise ValueError(f"{path}: no array named 'images' or 'x' (arrays: {names})")
        if label_key is not None and labels is not None:
            raise ValueError(f"{path} holds labels ({label_key!r}); labels= is for sources without them")
        pixels = archive[image_key]
        found = archive[label_key] if label_key is not None else labels
    return _read_array(pixels, path.stem, reader, found)


# --- Parquet --------------------------------------------------------------------------------------


def _is_records(schema: pa.Schema) -> bool:
    return "pixels" in schema.names and data.SHAPE_KEY in (schema.metadata or {})


def _read_parquet(paths: list[Path], reader: _Reader, columns: _Columns) -> Iterator[Images]:
    schemas = [_parquet_schema(p) for p in paths]
    kinds = [_is_records(schema) for schema in schemas]
    if all(kinds):
        return _read_records(paths, reader)
    if any(kinds):
        raise ValueError(f"{paths[0].parent}: mixes image records with Parquet files of encoded images")
    for path, schema in zip(paths, schemas, strict=True):
        _check_columns(schema, columns, path)
    return (images for path in paths for images in _decode_batches(_parquet_batches(path, reader.block_rows, columns),
                                                                   path.stem, reader, columns))


def _parquet_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from error


def _parquet_batches(path: Path, rows: int, columns: _Columns | None = None) -> Iterator[pa.RecordBatch]:
    """The file's rows in batches of `rows` (only the columns of `columns` when given), the file open meanwhile."""
    with pq.ParquetFile(path) as file:
        wanted = None if columns is None else _wanted(file.schema_arrow, columns)
        yield from file.iter_batches(batch_size=rows, columns=wanted)


def _read_records(paths: list[Path], reader: _Reader) -> Iterator[Images]:
    for path in paths:
        metadata = pq.read_schema(path).metadata
        for batch in _parquet_batches(path, reader.block_rows):
            yield from reader.arrays_of(data.table_to_images(pa.Table.from_batches([batch]).replace_schema_metadata(
                metadata)))


def _check_columns(schema: pa.Schema, columns: _Columns, where: Any) -> None:
    if columns.image not in schema.names:
        raise ValueError(f"{where}: no image column {columns.image!r} (columns: {schema.names}); name it with "
                         "image_column=")
    if columns.id is not None and columns.id not in schema.names:
        raise ValueError(f"{where}: no id column {columns.id!r} (columns: {schema.names})")
    kind = schema.field(columns.image).type
    is_struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or is_struct):
        raise ValueError(f"{where}: image column {columns.image!r} has type {kind}; expected encoded image bytes "
                         "(binary) or a struct with a 'bytes' field (the Hugging Face datasets Image layout)")


def _wanted(schema: pa.Schema, columns: _Columns) -> list[str]:
    return [c for c in (columns.image, columns.label, columns.id) if c is not None and c in schema.names]


def _decode_batches(batches: Iterable[pa.RecordBatch], stem: str, reader: _Reader,
                    columns: _Columns) -> Iterator[Images]:
    """Decode the encoded images of record batches; rows are numbered across the batches."""
    row = 0
    for batch in batches:
        yield from _decode_batch(batch, stem, row, reader, columns)
        row += batch.num_rows


def _decode_batch(batch: pa.RecordBatch, stem: str, row: int, reader: _Reader,
                  columns: _Columns) -> Iterator[Images]:
    names = batch.schema.names
    values = batch.column(columns.image).to_pylist()
    encoded = [v["bytes"] if isinstance(v, dict) else v for v in values]
    ids = [f"{stem}-{row + i}" for i in range(batch.num_rows)]
    if columns.id is not None:
        ids = [fallback if v is None else str(v)
               for v, fallback in zip(batch.column(columns.id).to_pylist(), ids, strict=True)]
    labels = _as_labels(batch.column(columns.label).to_pylist(), batch.num_rows, stem) \
        if columns.label in names else None
    return reader.encoded(encoded, ids, labels)


# --- blocks ---------------------------------------------------------------------------------------


def _reblock(blocks: Iterable[Images], rows: int) -> Iterator[Images]:
    """The same images in blocks of exactly `rows` (the last one shorter)."""
    pending: list[Images] = []
    count = 0
    for block in blocks:
        if not len(block):
            continue
        pending.append(block)
        count += len(block)
        while count >= rows:
            merged = _concat(pending)
            yield _take(merged, slice(0, rows))
            rest = _take(merged, slice(rows, None))
            pending, count = ([rest] if len(rest) else []), len(rest)
    if pending:
        yield _concat(pending)


def _concat(blocks: list[Images]) -> Images:
    if len(blocks) == 1:
        return blocks[0]
    labels = None
    if any(b.labels is not None for b in blocks):
        labels = [label for b in blocks for label in (b.labels or [None] * len(b))]
    return Images(np.concatenate([b.pixels for b in blocks]), [i for b in blocks for i in b.ids], labels)


def _take(images: Images, rows: slice) -> Images:
    return Images(images.pixels[rows], images.ids[rows], None if images.labels is None else images.labels[rows])


# --------------------------------------------------------------------------------------------------
# Drops
# --------------------------------------------------------------------------------------------------


def check_dropped(report: ReadReport, max_dropped: float) -> None:
    """A ValueError when no image was read, every one was dropped, or the dropped share exceeds `max_dropped`
    (a fraction in [0, 1]), naming each reason with its count and first ids; otherwise the report is logged."""
    if not 0 <= max_dropped <= 1:
        raise ValueError(f"max_dropped must be a fraction in [0, 1]; got {max_dropped!r}")
    source = report.source or "the source"
    if report.total == 0:
        raise ValueError(f"no images read from {source}")
    dropped = len(report.dropped)
    if dropped == report.total:
        raise ValueError(f"every one of the {dropped} images from {source} was dropped: {_reasons(report.dropped)}")
    if dropped > max_dropped * report.total:
        raise ValueError(f"{dropped} of {report.total} images from {source} ({dropped / report.total:.1%}) were "
                         f"dropped, more than max_dropped = {max_dropped}: {_reasons(report.dropped)}")
    report.log(logger)
