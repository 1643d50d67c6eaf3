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

Normalization follows `ImageFormat`: PIL modes to grey or RGB, 16-bit to 8-bit, alpha composited over a
background, then the channel count, then the size (ADM's centre crop by default). Every conversion is
counted in a `ReadReport`; an image PIL cannot decode is dropped with its reason, never half-read, and
`check_dropped` turns too many drops into one error.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from archipelago.domains.images import data

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FITS = ("crop", "resize", "pad")
_IDX_IMAGES = re.compile(r"idx3-ubyte(\.gz)?$")
_IDX_OTHER = re.compile(r"idx\d-ubyte(\.gz)?$")
_IDX_UINT8 = 0x08
_SHOWN_IDS = 5
_SHOWN_FILES = 3
_SOURCES = ("a folder of images (one sub-folder per class) or of .parquet files, an image, IDX, .npy, .npz or "
            ".parquet file, a numpy array, a tuple (array, labels), a list of PIL images, a pyarrow Table or Images")


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
# Reading
# --------------------------------------------------------------------------------------------------


def read_images(source: Any, fmt: ImageFormat = ImageFormat(), *, report: ReadReport | None = None,
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
    # hidden entries are skipped: the writers' temporary files start with a dot
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


def _reasons(dropped: list[tuple[str, str]]) -> str:
    by_reason: dict[str, list[str]] = {}
    for image_id, reason in dropped:
        by_reason.setdefault(reason, []).append(image_id)
    return "; ".join(f"{reason}: {len(ids)} ({_first(ids, _SHOWN_IDS)})" for reason, ids in by_reason.items())


def _first(names: Sequence[str], n: int) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
