"""Image reading, records and writing (`domains/images/io.py`, `data.py`, `writers.py`): every source reads
the same pixels and labels, MNIST's IDX files, block reading, dropped files with their reasons, the
normalization of modes and sizes with its counts, clear errors, and round trips through records and PNGs."""

from __future__ import annotations

import gzip
import os
import struct
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile

from archipelago.domains.images import data, writers
from archipelago.domains.images.io import ImageFormat, Images, ReadReport, check_dropped, read_idx, read_images

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "images" / "mnist"
LABELS = ["3", "7"]  # digits, so that IDX label files can hold them too


def _reference(channels: int, n: int = 6, seed: int = 0) -> Images:
    pixels = np.random.default_rng(seed).integers(0, 256, (n, 5, 7, channels), dtype=np.uint8)
    return Images(pixels, [f"img{i}" for i in range(n)], [LABELS[i % 2] for i in range(n)])


def _pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def _encoded(pixels: np.ndarray, format: str = "PNG") -> bytes:
    buffer = BytesIO()
    _pil(pixels).save(buffer, format=format)
    return buffer.getvalue()


def _read_all(source, **options) -> Images:
    blocks = list(read_images(source, **options))
    labels = None if blocks[0].labels is None else [label for b in blocks for label in b.labels]
    return Images(np.concatenate([b.pixels for b in blocks]), [i for b in blocks for i in b.ids], labels)


def _content(images: Images) -> list[tuple[bytes, str | None]]:
    """The images as a sorted list of (pixel bytes, label): equal for the same images in any order."""
    labels = images.labels or [None] * len(images)
    return sorted((p.tobytes(), label) for p, label in zip(images.pixels, labels, strict=True))


def _write_idx(path: Path, array: np.ndarray, magic: bytes = b"\x00\x00\x08") -> Path:
    raw = magic + bytes([array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def _write_folder(root: Path, images: Images) -> Path:
    for pixels, image_id, label in zip(images.pixels, images.ids, images.labels, strict=True):
        (root / label).mkdir(parents=True, exist_ok=True)
        _pil(pixels).save(root / label / f"{image_id}.png")
    return root


def _encoded_table(images: Images, struct_column: bool = False) -> pa.Table:
    encoded = [_encoded(p) for p in images.pixels]
    layout = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face datasets' Image
    column = pa.array([{"bytes": b, "path": None} for b in encoded], layout) if struct_column else pa.array(encoded)
    return pa.table({"image": column, "label": images.labels})


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def _folder(tmp: Path, ref: Images):
    return _write_folder(tmp / "folder", ref), {}


def _idx(tmp: Path, ref: Images):
    pixels = ref.pixels[..., 0] if ref.pixels.shape[-1] == 1 else ref.pixels
    _write_idx(tmp / "set-labels-idx1-ubyte.gz", np.array([int(label) for label in ref.labels]))
    return _write_idx(tmp / "set-images-idx3-ubyte.gz", pixels), {}


def _npy(tmp: Path, ref: Images):
    np.save(tmp / "x.npy", ref.pixels)
    return tmp / "x.npy", {"labels": ref.labels}


def _npz(tmp: Path, ref: Images):
    np.savez(tmp / "x.npz", images=ref.pixels, labels=np.array([int(label) for label in ref.labels]))
    return tmp / "x.npz", {}


def _parquet(tmp: Path, ref: Images):
    pq.write_table(_encoded_table(ref), tmp / "x.parquet")
    return tmp / "x.parquet", {}


def _parquet_struct(tmp: Path, ref: Images):
    pq.write_table(_encoded_table(ref, struct_column=True), tmp / "x.parquet")
    return tmp / "x.parquet", {}


def _parquet_folder(tmp: Path, ref: Images):
    table = _encoded_table(ref)
    (tmp / "pq").mkdir()
    pq.write_table(table.slice(0, 2), tmp / "pq" / "a.parquet")
    pq.write_table(table.slice(2), tmp / "pq" / "b.parquet")
    return tmp / "pq", {}


def _records_parquet(tmp: Path, ref: Images):
    pq.write_table(data.images_to_table(ref), tmp / "records.parquet")
    return tmp / "records.parquet", {}


SOURCES = {
    "class folders": _folder,
    "IDX with its labels file": _idx,
    "npy": _npy,
    "npz": _npz,
    "array tuple": lambda tmp, ref: ((ref.pixels, ref.labels), {}),
    "bare array": lambda tmp, ref: (ref.pixels[..., 0] if ref.pixels.shape[-1] == 1 else ref.pixels,
                                    {"labels": ref.labels}),
    "PIL list": lambda tmp, ref: ([_pil(p) for p in ref.pixels], {"labels": ref.labels}),
    "Parquet binary column": _parquet,
    "Parquet datasets struct": _parquet_struct,
    "Parquet folder": _parquet_folder,
    "encoded table": lambda tmp, ref: (_encoded_table(ref), {}),
    "records table": lambda tmp, ref: (data.images_to_table(ref), {}),
    "records Parquet": _records_parquet,
    "Images": lambda tmp, ref: (ref, {}),
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(SOURCES))
def test_every_source_reads_the_same_pixels_and_labels(tmp_path, name, channels):
    ref = _reference(channels)
    source, options = SOURCES[name](tmp_path, ref)
    report = ReadReport()
    images = _read_all(source, report=report, **options)
    assert images.pixels.dtype == np.uint8 and images.pixels.shape == ref.pixels.shape
    assert _content(images) == _content(ref)
    assert report.total == len(ref) and not report.dropped and not report.normalized


def test_single_image_file(tmp_path):
    ref = _reference(3, n=1)
    _pil(ref.pixels[0]).save(tmp_path / "one.PNG")
    images = _read_all(tmp_path / "one.PNG")
    assert images.ids == ["one.PNG"] and images.labels is None
    np.testing.assert_array_equal(images.pixels, ref.pixels)


def test_folder_ids_are_relative_paths_sorted_and_labels_are_the_class_folders(tmp_path):
    ref = _reference(3)
    images = _read_all(_write_folder(tmp_path, ref))
    assert images.ids == ["3/img0.png", "3/img2.png", "3/img4.png", "7/img1.png", "7/img3.png", "7/img5.png"]
    assert images.labels == ["3", "3", "3", "7", "7", "7"]


def test_parquet_ids_from_the_id_column_and_null_labels_stay_none(tmp_path):
    ref = _reference(1, n=3)
    table = pa.table({"image": [_encoded(p) for p in ref.pixels], "name": ["a", "b", None],
                      "label": pa.array([1, None, 2])})
    pq.write_table(table, tmp_path / "t.parquet")
    images = _read_all(tmp_path / "t.parquet", id_column="name")
    assert images.ids == ["a", "b", "t-2"]
    assert images.labels == ["1", None, "2"]


def test_mnist_t10k_first_block():
    if not MNIST.is_dir():
        pytest.skip(f"MNIST IDX files not found at {MNIST}")
    block = next(read_images(MNIST / "t10k-images-idx3-ubyte.gz", block_rows=512))
    assert block.pixels.shape == (512, 28, 28, 1) and block.pixels.dtype == np.uint8
    assert block.labels[0] == "7"
    assert set(block.labels) == {str(d) for d in range(10)}
    assert block.pixels.max() == 255 and block.pixels.min() == 0


# --------------------------------------------------------------------------------------------------
# IDX errors
# --------------------------------------------------------------------------------------------------


def test_idx_with_a_bad_magic_is_an_error_naming_the_file(tmp_path):
    path = _write_idx(tmp_path / "bad-images-idx3-ubyte", np.zeros((2, 3, 3)), magic=b"\x01\x00\x08")
    with pytest.raises(ValueError, match=r"bad-images-idx3-ubyte.*magic"):
        read_images(path)


def test_idx_with_an_unsupported_dtype_is_an_error(tmp_path):
    path = _write_idx(tmp_path / "f-images-idx3-ubyte", np.zeros((2, 3, 3)), magic=b"\x00\x00\x0d")
    with pytest.raises(ValueError, match=r"f-images-idx3-ubyte.*dtype code 0x0D"):
        read_idx(path)


@pytest.mark.parametrize("name", ["cut-images-idx3-ubyte", "cut-images-idx3-ubyte.gz"])
def test_truncated_idx_is_an_error_naming_the_file(tmp_path, name):
    whole = _write_idx(tmp_path / "whole-images-idx3-ubyte", np.ones((4, 5, 5)))
    raw = whole.read_bytes()[:-7]
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(ValueError, match=rf"{name}: truncated IDX file"):
        read_idx(tmp_path / name)


def test_idx_labels_file_as_source_and_label_count_mismatch_are_errors(tmp_path):
    _write_idx(tmp_path / "s-images-idx3-ubyte", np.zeros((3, 2, 2)))
    labels = _write_idx(tmp_path / "s-labels-idx1-ubyte", np.arange(2))
    with pytest.raises(ValueError, match="pass the images file"):
        read_images(labels)
    with pytest.raises(ValueError, match=r"s-labels-idx1-ubyte.*s-images-idx3-ubyte"):
        read_images(tmp_path / "s-images-idx3-ubyte")


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_parquet_is_read_in_blocks_of_block_rows(tmp_path, split):
    ref = _reference(3, n=10)
    table = _encoded_table(ref)
    if split:  # two files of 5: blocks still fill up across files
        pq.write_table(table.slice(0, 5), tmp_path / "a.parquet")
        pq.write_table(table.slice(5), tmp_path / "b.parquet")
        source = tmp_path
    else:
        source = tmp_path / "x.parquet"
        pq.write_table(table, source)
    blocks = list(read_images(source, block_rows=4))
    assert [len(b) for b in blocks] == [4, 4, 2]
    assert _content(_read_all(source, block_rows=4)) == _content(ref)


# --------------------------------------------------------------------------------------------------
# Dropped images
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def damaged_folder(tmp_path) -> Path:
    ref = _reference(3, n=7)
    for pixels, image_id in zip(ref.pixels, ref.ids, strict=True):
        _pil(pixels).save(tmp_path / f"{image_id}.png")
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(_encoded(ref.pixels[0])[:-30])
    big = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    (tmp_path / "cut.jpg").write_bytes(_encoded(big, "JPEG")[:400])
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_unreadable_and_truncated_files_are_dropped_with_reasons(damaged_folder):
    report = ReadReport()
    images = _read_all(damaged_folder, report=report)
    assert len(images) == 7 and report.total == 10
    reasons = dict(report.dropped)
    assert set(reasons) == {"bad.png", "cut.png", "cut.jpg"}
    assert "identify" in reasons["bad.png"]
    assert "truncated" in reasons["cut.jpg"].lower() and "truncated" in reasons["cut.png"].lower()
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_check_dropped_raises_past_max_dropped_naming_reasons_and_ids(damaged_folder):
    report = ReadReport()
    _read_all(damaged_folder, report=report)
    with pytest.raises(ValueError, match=r"3 of 10 images.*identify: 1 \(bad.png\).*cut.jpg"):
        check_dropped(report, 0.2)
    check_dropped(report, 0.3)


def test_check_dropped_raises_when_nothing_was_read():
    with pytest.raises(ValueError, match="no images read"):
        check_dropped(ReadReport(source="nowhere"), 1.0)


# --------------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_modes(tmp_path) -> Path:
    """Five 4x4 PNGs sorted grey first: L, RGB, RGBA with a transparent pixel, 16-bit I;16, palette."""
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(tmp_path / "a_grey.png")
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(tmp_path / "b_rgb.png")
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)
    Image.fromarray(rgba).save(tmp_path / "c_rgba.png")
    Image.fromarray(np.arange(16, dtype=np.uint16).reshape(4, 4) * 257 * 16).save(tmp_path / "d_16bit.png")
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).quantize(8).save(tmp_path / "e_palette.png")
    return tmp_path


def test_mixed_modes_to_rgb_are_counted(mixed_modes):
    report = ReadReport()
    images = _read_all(mixed_modes, fmt=ImageFormat(channels=3), report=report)
    assert images.pixels.shape == (5, 4, 4, 3)
    assert report.normalized == {"grey -> RGB": 2, "RGBA -> RGB (alpha over 255)": 1, "16-bit -> 8-bit": 1,
                                 "palette -> RGB": 1}
    np.testing.assert_array_equal(images.pixels[2, 0, 0], [255, 255, 255])  # fully transparent: the background
    np.testing.assert_array_equal(images.pixels[3, ..., 0], np.arange(16).reshape(4, 4) * 16)  # 257 k -> k


def test_mixed_modes_to_grey_use_pils_luma(mixed_modes):
    report = ReadReport()
    images = _read_all(mixed_modes, report=report)  # the first image is grey: channels 1
    assert images.pixels.shape == (5, 4, 4, 1)
    assert report.normalized == {"RGB -> grey": 3, "RGBA -> RGB (alpha over 255)": 1, "16-bit -> 8-bit": 1,
                                 "palette -> RGB": 1}
    expected = np.asarray(Image.open(mixed_modes / "b_rgb.png").convert("L"))
    np.testing.assert_array_equal(images.pixels[1, ..., 0], expected)


def test_rgb_to_grey_is_pils_luma():
    rgb = np.random.default_rng(3).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb[0]).convert("L"))
    np.testing.assert_array_equal(_read_all(rgb, fmt=ImageFormat(channels=1)).pixels[0, ..., 0], expected)


def test_32_bit_integer_images_are_16_bit_when_a_value_exceeds_255():
    wide = Image.fromarray(np.array([[0, 257 * 9], [65535, 257]], np.int32))  # mode "I"
    narrow = Image.fromarray(np.array([[0, 9], [255, 1]], np.int32))
    report = ReadReport()
    images = _read_all([wide, narrow], report=report)
    np.testing.assert_array_equal(images.pixels[..., 0], [[[0, 9], [255, 1]]] * 2)
    assert report.normalized == {"16-bit -> 8-bit": 1, "32-bit integer -> 8-bit": 1}


def test_alpha_is_composited_over_the_background(tmp_path):
    rgba = np.zeros((1, 2, 2, 4), np.uint8)
    rgba[0, 0, 0] = (200, 100, 50, 255)
    rgba[0, 1, 1] = (200, 100, 50, 51)  # a fifth opaque
    images = _read_all(rgba, fmt=ImageFormat(background=0))
    np.testing.assert_array_equal(images.pixels[0, 0, 0], [200, 100, 50])
    np.testing.assert_array_equal(images.pixels[0, 0, 1], [0, 0, 0])
    np.testing.assert_array_equal(images.pixels[0, 1, 1], [40, 20, 10])


def test_uint16_and_float_arrays_become_8_bit_and_floats_outside_unit_range_are_an_error():
    report = ReadReport()
    images = _read_all(np.array([[[0, 257 * 3], [65535, 257 * 200]]], np.uint16), report=report)
    np.testing.assert_array_equal(images.pixels[0, ..., 0], [[0, 3], [255, 200]])
    assert report.normalized == {"16-bit -> 8-bit": 1}
    np.testing.assert_array_equal(_read_all(np.full((1, 2, 2, 3), 0.5)).pixels, 128)
    with pytest.raises(ValueError, match=r"\[0, 1\].*min -0.5, max 2.0"):
        list(read_images(np.array([[[-0.5, 2.0]]])))


def test_multi_frame_gif_reads_its_first_frame(tmp_path):
    frames = [Image.new("L", (3, 3), 40), Image.new("L", (3, 3), 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    report = ReadReport()
    images = _read_all(tmp_path / "anim.gif", fmt=ImageFormat(channels=1), report=report)
    assert report.normalized["multi-frame -> first frame"] == 1
    np.testing.assert_array_equal(images.pixels, 40)


@pytest.fixture
def mixed_sizes(tmp_path) -> Path:
    """Three 8x8 grey images and two 8 high, 16 wide ones: white with black 4-pixel side borders."""
    for i in range(3):
        Image.new("L", (8, 8), 100).save(tmp_path / f"a{i}.png")
    wide = np.full((8, 16), 255, np.uint8)
    wide[:, :4] = wide[:, -4:] = 0
    for i in range(2):
        Image.fromarray(wide).save(tmp_path / f"b{i}.png")
    return tmp_path


def test_mixed_sizes_without_a_size_are_an_error_naming_sizes_and_images(mixed_sizes):
    with pytest.raises(ValueError, match=r"8x8: 3, 16x8: 2.*b0.png, b1.png.*size=\(8, 8\)"):
        _read_all(mixed_sizes)


@pytest.mark.parametrize("fit", ["crop", "resize", "pad"])
def test_each_fit_brings_images_to_the_size(mixed_sizes, fit):
    report = ReadReport()
    images = _read_all(mixed_sizes, fmt=ImageFormat(size=(8, 8), fit=fit), report=report)
    assert images.pixels.shape == (5, 8, 8, 1)
    assert report.normalized == {f"16x8 -> 8x8 ({fit})": 2}
    wide = images.pixels[3, ..., 0].astype(int)
    if fit == "crop":  # the centre 8 columns: white
        assert wide.min() >= 250
    elif fit == "resize":  # squeezed: the black borders stay at the sides
        assert wide[:, 0].max() < 30 and wide[:, 4].min() > 225
    else:  # downscaled to 4 x 8, padded with zero rows above and below
        assert wide[:2].max() == 0 and wide[-2:].max() == 0 and wide[3:5, 4].min() > 225


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def _empty_folder(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    (tmp / "empty" / "readme.txt").write_text("no images")
    return tmp / "empty"


def _empty_class_folder(tmp: Path) -> Path:
    (tmp / "set" / "cats").mkdir(parents=True)
    (tmp / "set" / "dogs").mkdir()
    Image.new("L", (2, 2)).save(tmp / "set" / "cats" / "c.png")
    return tmp / "set"


def _mixed_root(tmp: Path) -> Path:
    _empty_class_folder(tmp)
    Image.new("L", (2, 2)).save(tmp / "set" / "dogs" / "d.png")
    Image.new("L", (2, 2)).save(tmp / "set" / "stray.png")
    return tmp / "set"


def _no_image_column(tmp: Path) -> Path:
    pq.write_table(pa.table({"picture": [b"x"], "label": ["a"]}), tmp / "t.parquet")
    return tmp / "t.parquet"


@pytest.mark.parametrize(("make", "error", "message"), [
    (_empty_folder, ValueError, r"empty: no image files \(looked for .png"),
    (_empty_class_folder, ValueError, r"class folder .*dogs holds no image files"),
    (_mixed_root, ValueError, r"mixes unlabelled images with class folders: stray.png"),
    (lambda tmp: tmp / "missing", FileNotFoundError, r"missing: no such file"),
    (lambda tmp: {"images": 1}, TypeError, r"cannot read images from dict: pass a folder"),
    (lambda tmp: np.zeros((2, 3)), ValueError, r"\(2, 3\).*\[N, H, W\]"),
    (lambda tmp: np.zeros((2, 3, 3, 2), np.uint8), ValueError, r"\(2, 3, 3, 2\)"),
    (_no_image_column, ValueError, r"no image column 'image' \(columns: \['picture', 'label'\]\)"),
])
def test_bad_sources_are_clear_errors(tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        read_images(make(tmp_path))


def test_image_format_is_validated():
    for bad, field in [({"channels": 2}, "channels"), ({"size": (0, 4)}, "size"), ({"fit": "zoom"}, "fit"),
                       ({"background": 256}, "background")]:
        with pytest.raises(ValueError, match=f"ImageFormat.{field}"):
            ImageFormat(**bad)


# --------------------------------------------------------------------------------------------------
# Records, tensors, writers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labelled", [True, False])
def test_records_round_trip_exactly(labelled):
    ref = _reference(3)
    ref = ref if labelled else Images(ref.pixels, ref.ids, None)
    table = data.images_to_table(ref)
    assert ("label" in table.column_names) == labelled and data.image_shape(table) == (5, 7, 3)
    back = data.table_to_images(table)
    np.testing.assert_array_equal(back.pixels, ref.pixels)
    assert back.ids == ref.ids and back.labels == ref.labels
    both = data.concat_tables([table, data.images_to_table(_reference(3, seed=1))])
    assert len(both) == 12 and data.image_shape(both) == (5, 7, 3)


def test_records_without_shape_or_with_a_short_row_are_errors():
    table = data.images_to_table(_reference(1))
    with pytest.raises(ValueError, match="archipelago.image_shape"):
        data.table_to_images(table.replace_schema_metadata(None))
    short = table.set_column(1, "pixels", pa.array([b"\x00" * 35] * 5 + [b"\x00" * 3]))
    with pytest.raises(ValueError, match=r"1 rows do not hold H\*W\*C = 35 bytes: img5 \(3\)"):
        data.table_to_images(short)


def test_unit_range_round_trip_is_exact():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    x = data.to_unit(pixels)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(data.from_unit(x), pixels)
    np.testing.assert_array_equal(data.from_unit(torch.full((1, 1, 1, 1), 3.0)), [[[[255]]]])


def test_downsampled_is_an_area_average():
    pixels = np.zeros((1, 16, 16, 1), np.uint8)
    pixels[:, :, :8] = 255
    np.testing.assert_allclose(data.downsampled(pixels, side=2), [[1, 0, 1, 0]])
    assert data.downsampled(_reference(3).pixels, side=4).shape == (6, 48)


@pytest.mark.parametrize("labelled", [True, False])
def test_write_pngs_reads_back_with_labels_and_leaves_no_temp_files(tmp_path, labelled):
    ref = _reference(3)
    ref = Images(ref.pixels, [f"x/{i}" for i in range(len(ref))], ref.labels if labelled else None)
    paths = writers.write_pngs(ref, tmp_path / "out")
    assert len(set(paths)) == len(ref) and all(p.is_file() for p in paths)
    back = _read_all(tmp_path / "out")
    assert _content(back) == _content(ref)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".")]


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def failing_save(image, fp, *args, **kwargs):
        fp.write(b"half a PNG")
        raise OSError("disk full")

    with monkeypatch.context() as patch:  # encoding fails half-way
        patch.setattr(Image.Image, "save", failing_save)
        with pytest.raises(OSError, match="disk full"):
            writers.write_pngs(_reference(1, n=1), tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)  # the file is written, then cannot take its name
    with pytest.raises(OSError, match="disk full"):
        writers.write_pngs(_reference(1, n=1), tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_write_pngs_makes_ids_safe_and_unique(tmp_path):
    pixels = np.zeros((2, 2, 2, 1), np.uint8)
    paths = writers.write_pngs(Images(pixels, ["a/b.png", "a_b"], None), tmp_path)
    assert [p.name for p in paths] == ["a_b.png", "a_b-2.png"]


def test_grid_has_the_expected_size_and_padding():
    pixels = np.full((5, 8, 6, 3), 200, np.uint8)
    image = writers.grid(pixels)  # 3 columns, 2 rows
    assert image.size == (3 * 6 + 2 * 2, 2 * 8 + 2) and image.mode == "RGB"
    canvas = np.asarray(image)
    assert canvas[:, 6:8].max() == 0 and canvas[8:10].max() == 0 and canvas[10:, 16:].max() == 0
    assert canvas[0, 0, 0] == 200 and writers.grid(pixels, columns=5, padding=0).size == (30, 8)
