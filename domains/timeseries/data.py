"""Time-series data: reading a user's series, min-max scaling, windows, features and Arrow records.

The benchmark recipe of TimeGAN (Yoon et al. 2019) and Diffusion-TS (Yuan & Qiao 2024): fit a
per-channel min-max scaler on the raw series [T, C], scale the series to [0, 1], then cut windows of
24 steps with stride 1, giving (T - 24) // 1 + 1 windows [N, 24, C] (Stocks: 3,662; Energy: 19,712).
Sines is generated, not read: each channel is sin(f t + p) with f, p ~ U[0, 0.1], mapped to [0, 1].

Files are read as given: no row is reordered (TimeGAN flips the stock file, Diffusion-TS does not).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

logger = logging.getLogger(__name__)

Source = str | Path | pd.DataFrame | np.ndarray

WINDOW_COLUMN = "x"
SHAPE_KEY = b"archipelago.window_shape"  # schema metadata: JSON [L, C]


# --------------------------------------------------------------------------------------------------
# Reading a user's series
# --------------------------------------------------------------------------------------------------


def read_frame(source: Source, columns: Sequence[str] | None = None, only: bool = False) -> pd.DataFrame:
    """Read a series [T, C] from a .csv/.parquet path, a DataFrame or an array into float64 columns.

    With `columns=None` every numeric column is kept and the skipped text columns are logged;
    otherwise exactly `columns`, in that order, matched by name (with `only`, another numeric
    column is an error: data matched to a fitted run must have the run's channels and no more).
    A column of numbers with a stray text cell is an error naming the cell. Rows keep their order
    and get a fresh 0-based index.
    """
    frame, name = _load(source)
    chosen = _choose_columns(frame, columns, name)
    if only and (extra := [c for c in _numeric_columns(frame, name) if c not in chosen]):
        raise ValueError(f"{name}: columns {extra} are not among the run's columns {list(chosen)}")
    if len(frame) == 0:
        raise ValueError(f"{name}: no rows")
    out = pd.DataFrame({column: frame[column].to_numpy(dtype=np.float64) for column in chosen})
    _check_finite(out, name)
    return out


def _load(source: Source) -> tuple[pd.DataFrame, str]:
    """The raw frame (column labels as strings) and a name for error messages."""
    if isinstance(source, pd.DataFrame):
        frame, name = source, "<DataFrame>"
    elif isinstance(source, np.ndarray):
        frame, name = _array_frame(source), "<array>"
    elif isinstance(source, (str, Path)):
        frame, name = _read_file(Path(source)), str(source)
    else:
        raise TypeError(f"cannot read a series from {type(source).__name__}: pass a path, DataFrame or array")
    return frame.set_axis([str(c) for c in frame.columns], axis=1).reset_index(drop=True), name


def _array_frame(values: np.ndarray) -> pd.DataFrame:
    """[T] or [T, C] array -> DataFrame with columns c0..c{C-1}."""
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(
            f"expected a series [T, C] (or [T]), got an array of shape {values.shape}; "
            "windows [N, L, C] go through `from_windows`, not `read_frame`"
        )
    return pd.DataFrame(values, columns=[f"c{i}" for i in range(values.shape[1])])


def _read_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"{path}: unknown file type {suffix!r}; expected .csv or .parquet")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return pd.read_csv(path, encoding=_text_encoding(path)) if suffix == ".csv" else pd.read_parquet(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: cannot parse as csv: it is not UTF-8 ({e.reason} at byte {e.start}); "
                         f"save it as UTF-8") from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot parse as {suffix[1:]}: {e}") from e


_BYTE_ORDER_MARKS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _text_encoding(path: Path) -> str:
    """UTF-8, unless the file starts with the byte-order mark of UTF-8 or UTF-16 (as spreadsheet
    programs write them)."""
    with open(path, "rb") as f:
        start = f.read(3)
    return next((encoding for mark, encoding in _BYTE_ORDER_MARKS if start.startswith(mark)), "utf-8")


def _choose_columns(frame: pd.DataFrame, columns: Sequence[str] | None, name: str) -> list[str]:
    """The channel names: all numeric columns, or the requested ones after checks."""
    numeric = _numeric_columns(frame, name)
    if columns is None:
        skipped = [c for c in frame.columns if c not in numeric]
        if skipped:
            logger.warning("%s: skipping non-numeric columns %s", name, skipped)
        if not numeric:
            raise ValueError(f"{name}: no numeric column among {list(frame.columns)}")
        return numeric
    columns = [str(c) for c in columns]
    if not columns:
        raise ValueError(f"{name}: `columns` is empty")
    if len(set(columns)) != len(columns):
        raise ValueError(f"{name}: duplicate names in columns {columns}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: no column {missing[0]!r} (missing {missing}; has {list(frame.columns)})")
    for column in columns:
        if column not in numeric:
            raise ValueError(f"{name}: column {column!r} is not numeric (dtype {frame[column].dtype})")
    return columns


def _numeric_columns(frame: pd.DataFrame, name: str) -> list[str]:
    """The numeric columns; a text column whose cells are mostly numbers is a column of numbers
    with stray text cells, an error naming the first one (as a NaN cell is), not a column to skip."""
    numeric = []
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values):
            numeric.append(column)
            continue
        parsed = pd.to_numeric(values, errors="coerce")
        stray = parsed.isna() & values.notna()
        if parsed.notna().sum() > stray.sum():
            row = int(np.argmax(stray.to_numpy()))
            raise ValueError(f"{name}: column {column!r} holds numbers but row {row} (0-based, header excluded) "
                             f"is {values.iloc[row]!r}, not a number")
    return numeric


def _check_finite(frame: pd.DataFrame, name: str) -> None:
    for column in frame.columns:
        bad = ~np.isfinite(frame[column].to_numpy())
        if bad.any():
            raise ValueError(
                f"{name}: column {column!r} has {int(bad.sum())} NaN or infinite values, "
                f"first at row {int(np.argmax(bad))} (0-based, header excluded)"
            )


# --------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------


def sliding_windows(
    values: np.ndarray, length: int = 24, stride: int = 1, *, name: str | None = None
) -> np.ndarray:
    """Cut a series [T, C] (or [T]) into (T - length) // stride + 1 windows [N, length, C]."""
    _check_positive_int(length=length, stride=stride)
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"expected a series [T, C], got shape {values.shape}")
    if len(values) < length:
        source = f"{name}: " if name else ""
        raise ValueError(f"{source}{len(values)} rows is fewer than one window of length {length}")
    windows = np.lib.stride_tricks.sliding_window_view(values, length, axis=0)[::stride]  # [N, C, L]
    return np.ascontiguousarray(windows.transpose(0, 2, 1))  # [N, L, C]


def _check_positive_int(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Min-max scaling
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MinMaxScaler:
    """Per-channel min-max scaling to [0, 1], fitted on the raw series [T, C].

    A constant channel (maximum == minimum) is scaled with a span of 1, as scikit-learn does: it maps
    to 0.0 and decodes back to its constant, with no division by zero. Fitting logs a warning for it.
    """

    minimum: tuple[float, ...]  # per channel, raw units
    maximum: tuple[float, ...]  # per channel, raw units
    columns: tuple[str, ...]  # channel names, in channel order

    def __post_init__(self) -> None:
        if not len(self.minimum) == len(self.maximum) == len(self.columns):
            raise ValueError("minimum, maximum and columns must have one entry per channel")
        if any(lo > hi for lo, hi in zip(self.minimum, self.maximum, strict=True)):
            raise ValueError("every minimum must be <= its maximum")

    @classmethod
    def fit(cls, values: np.ndarray, columns: Sequence[str] | None = None) -> MinMaxScaler:
        """Fit on values [..., C] (a series or windows); columns default to c0..c{C-1}."""
        values = np.asarray(values, dtype=np.float64)
        flat = values.reshape(-1, values.shape[-1])  # [T, C]
        if len(flat) == 0 or not np.isfinite(flat).all():
            raise ValueError("cannot fit a scaler on empty or non-finite values")
        columns = tuple(columns) if columns is not None else tuple(f"c{i}" for i in range(flat.shape[1]))
        scaler = cls(tuple(map(float, flat.min(axis=0))), tuple(map(float, flat.max(axis=0))), columns)
        for column, lo, hi in zip(scaler.columns, scaler.minimum, scaler.maximum, strict=True):
            if lo == hi:
                logger.warning("column %r is constant: it scales to 0.0 and decodes to its constant", column)
        return scaler

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Raw values [..., C] -> scaled values in [0, 1], float64."""
        low, span = self._low_span(values)
        return (np.asarray(values, dtype=np.float64) - low) / span

    def inverse_transform(self, values: np.ndarray) -> np.ndarray:
        """Scaled values [..., C] -> raw values, float64; a constant channel decodes to its constant."""
        low, span = self._low_span(values)
        constant = np.array(self.minimum) == np.array(self.maximum)
        return np.where(constant, low, np.asarray(values, dtype=np.float64) * span + low)

    def to_dict(self) -> dict[str, list]:
        """JSON-safe form."""
        return {"minimum": list(self.minimum), "maximum": list(self.maximum), "columns": list(self.columns)}

    @classmethod
    def from_dict(cls, data: dict) -> MinMaxScaler:
        return cls(
            tuple(float(v) for v in data["minimum"]),
            tuple(float(v) for v in data["maximum"]),
            tuple(str(c) for c in data["columns"]),
        )

    def _low_span(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if np.shape(values)[-1] != len(self.columns):
            raise ValueError(f"expected {len(self.columns)} channels, got shape {np.shape(values)}")
        low, high = np.array(self.minimum), np.array(self.maximum)
        span = high - low
        return low, np.where(span > 0, span, 1.0)


# --------------------------------------------------------------------------------------------------
# Sines
# --------------------------------------------------------------------------------------------------


def sines(n: int, length: int = 24, channels: int = 5, seed: int = 0) -> np.ndarray:
    """The Sines set of TimeGAN: n windows [n, length, channels] in [0, 1], float64.

    Each channel is sin(f t + p), f, p ~ U[0, 0.1], t = 0..length-1, then (x + 1) / 2 as in TimeGAN's
    `sine_data_generation`. Draws follow its order (per window, per channel: f then p).
    """
    _check_positive_int(n=n, length=length, channels=channels)
    draws = np.random.default_rng(seed).uniform(0.0, 0.1, size=(n, channels, 2))
    freq, phase = draws[..., 0], draws[..., 1]  # [n, C]
    t = np.arange(length, dtype=np.float64)  # [L]
    x = np.sin(freq[:, None, :] * t[None, :, None] + phase[:, None, :])  # [n, L, C]
    return (x + 1.0) * 0.5


# --------------------------------------------------------------------------------------------------
# Features for partitioning
# --------------------------------------------------------------------------------------------------


def window_features(windows: np.ndarray, fft_bins: int = 4) -> np.ndarray:
    """Features [N, C * (5 + k)] of windows [N, L, C] for k-means partitioning, float32.

    Per channel, concatenated in this order: mean, std, min, max, std of the first difference, and
    the amplitudes of rFFT bins 1..k (k = min(fft_bins, L // 2)) of the centred window, normalized by
    2 / L so that a sine of amplitude a on bin j gives a. Every feature is in the data's units.
    """
    windows = np.asarray(windows, dtype=np.float64)
    if windows.ndim != 3:
        raise ValueError(f"expected windows [N, L, C], got shape {windows.shape}")
    length = windows.shape[1]
    k = min(fft_bins, length // 2)
    centred = windows - windows.mean(axis=1, keepdims=True)  # [N, L, C]
    spectrum = np.abs(np.fft.rfft(centred, axis=1))[:, 1 : k + 1] * (2.0 / length)  # [N, k, C]
    diff_std = np.diff(windows, axis=1).std(axis=1) if length > 1 else np.zeros_like(windows[:, 0])
    stats = [windows.mean(axis=1), windows.std(axis=1), windows.min(axis=1), windows.max(axis=1), diff_std]
    spectral = spectrum.transpose(0, 2, 1).reshape(len(windows), -1)  # [N, C * k], channel-major
    return np.concatenate([*stats, spectral], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Arrow records
# --------------------------------------------------------------------------------------------------


def windows_to_table(windows: np.ndarray) -> pa.Table:
    """Windows [N, L, C] -> a table with one column "x" of fixed-size float32 lists of L * C values.

    Values are stored as float32 (exact for float32 input); the shape [L, C] goes in the schema
    metadata under `archipelago.window_shape`.
    """
    windows = np.asarray(windows)
    if windows.ndim != 3:
        raise ValueError(f"expected windows [N, L, C], got shape {windows.shape}")
    n, length, channels = windows.shape
    flat = pa.array(np.ascontiguousarray(windows, dtype=np.float32).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, length * channels)
    schema = pa.schema(
        [pa.field(WINDOW_COLUMN, column.type)], metadata={SHAPE_KEY: json.dumps([length, channels])}
    )
    return pa.Table.from_arrays([column], schema=schema)


def table_to_windows(table: pa.Table) -> np.ndarray:
    """A table written by `windows_to_table` -> windows [N, L, C], float32."""
    if WINDOW_COLUMN not in table.column_names:
        raise ValueError(f"table has no column {WINDOW_COLUMN!r} (has {table.column_names})")
    length, channels = _window_shape(table)
    field_type = table.schema.field(WINDOW_COLUMN).type
    if not (pa.types.is_fixed_size_list(field_type) and field_type.list_size == length * channels):
        expected = f"fixed_size_list<{length * channels}>"
        raise ValueError(f"column {WINDOW_COLUMN!r} must be {expected}, got {field_type}")
    column = table.column(WINDOW_COLUMN).combine_chunks()
    if column.null_count:
        raise ValueError(f"column {WINDOW_COLUMN!r} has {column.null_count} null windows")
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(table), length, channels)


def _window_shape(table: pa.Table) -> tuple[int, int]:
    metadata = table.schema.metadata or {}
    if SHAPE_KEY not in metadata:
        raise ValueError(f"table schema metadata has no {SHAPE_KEY.decode()!r} (the window shape [L, C])")
    length, channels = json.loads(metadata[SHAPE_KEY])
    return int(length), int(channels)
