"""Tests of the time-series data side: reading, windows, scaling, Sines, features, Arrow records."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from archipelago.domains.timeseries.data import (
    MinMaxScaler,
    read_frame,
    sines,
    sliding_windows,
    table_to_windows,
    window_features,
    windows_to_table,
)

STOCKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "timeseries" / "stock_data.csv"


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {"date": ["2020-01-01", "2020-01-02", "2020-01-03"], "a": [1.0, 2.0, 3.0], "b": [4, 5, 7]}
    )


# ---- reading --------------------------------------------------------------------------------------


def test_read_csv_skips_non_numeric_and_logs(tmp_path, frame, caplog):
    path = tmp_path / "series.csv"
    frame.to_csv(path, index=False)
    with caplog.at_level(logging.WARNING):
        out = read_frame(path)
    assert list(out.columns) == ["a", "b"]
    assert out.dtypes.eq(np.float64).all()
    np.testing.assert_array_equal(out.to_numpy(), [[1, 4], [2, 5], [3, 7]])
    assert "date" in caplog.text


def test_read_parquet_with_explicit_columns(tmp_path, frame):
    path = tmp_path / "series.parquet"
    frame.to_parquet(path)
    out = read_frame(str(path), columns=["b", "a"])
    assert list(out.columns) == ["b", "a"]
    np.testing.assert_array_equal(out["b"], [4.0, 5.0, 7.0])


def test_read_dataframe_and_arrays():
    df = read_frame(pd.DataFrame({"x": [1, 2], "y": [3.0, 4.0]}))
    assert list(df.columns) == ["x", "y"]
    two_d = read_frame(np.arange(6.0).reshape(3, 2))
    assert list(two_d.columns) == ["c0", "c1"]
    one_d = read_frame(np.arange(4.0))
    assert list(one_d.columns) == ["c0"] and len(one_d) == 4


def test_read_rejects_windows_array():
    with pytest.raises(ValueError, match="from_windows"):
        read_frame(np.zeros((2, 24, 3)))


def test_read_missing_column_names_column_and_file(tmp_path, frame):
    path = tmp_path / "series.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"series\.csv.*'zzz'"):
        read_frame(path, columns=["a", "zzz"])


def test_read_non_numeric_chosen_column(frame):
    with pytest.raises(ValueError, match="'date' is not numeric"):
        read_frame(frame, columns=["a", "date"])


def test_read_no_numeric_column():
    with pytest.raises(ValueError, match="no numeric column"):
        read_frame(pd.DataFrame({"s": ["x", "y"]}))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_read_non_finite_names_file_column_count_row(tmp_path, bad):
    path = tmp_path / "gappy.csv"
    pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": [1.0, bad, 3.0, bad]}).to_csv(path, index=False)
    with pytest.raises(
        ValueError, match=r"gappy\.csv: column 'b' has 2 NaN or infinite values, first at row 1"
    ):
        read_frame(path)


def test_read_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        read_frame(tmp_path / "absent.csv")
    (tmp_path / "series.txt").write_text("a\n1\n")
    with pytest.raises(ValueError, match=r"series\.txt.*unknown file type"):
        read_frame(tmp_path / "series.txt")
    (tmp_path / "broken.csv").write_text("a,b\n1,2\n3,4,5,6\n")
    with pytest.raises(ValueError, match=r"broken\.csv.*cannot parse"):
        read_frame(tmp_path / "broken.csv")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"broken\.parquet.*cannot parse"):
        read_frame(tmp_path / "broken.parquet")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv"):
        read_frame(tmp_path / "empty.csv")


@pytest.mark.skipif(not STOCKS.is_file(), reason=f"shared data set absent: {STOCKS}")
def test_read_real_stocks():
    frame = read_frame(STOCKS)
    assert frame.shape == (3685, 6)
    assert list(frame.columns) == ["Open", "High", "Low", "Close", "Adj_Close", "Volume"]
    scaler = MinMaxScaler.fit(frame.to_numpy(), frame.columns)
    windows = sliding_windows(scaler.transform(frame.to_numpy()), 24)
    assert windows.shape == (3662, 24, 6)
    assert windows.min() == 0.0 and windows.max() == 1.0


# ---- windows --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "length", "stride"), [(30, 24, 1), (30, 24, 4), (24, 24, 1), (50, 7, 3)])
def test_window_count_and_content(rows, length, stride):
    series = np.arange(rows * 2, dtype=np.float64).reshape(rows, 2)
    windows = sliding_windows(series, length, stride)
    count = (rows - length) // stride + 1
    assert windows.shape == (count, length, 2)
    last = (count - 1) * stride
    np.testing.assert_array_equal(windows[-1], series[last : last + length])
    assert windows.flags.c_contiguous


def test_window_errors():
    with pytest.raises(ValueError, match=r"stocks: 10 rows is fewer than one window of length 24"):
        sliding_windows(np.zeros((10, 3)), 24, name="stocks")
    with pytest.raises(ValueError, match="length"):
        sliding_windows(np.zeros((10, 3)), 0)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(np.zeros((10, 3)), 2, stride=0)


# ---- scaling --------------------------------------------------------------------------------------


def test_scaler_round_trip_float64():
    rng = np.random.default_rng(0)
    series = rng.normal(size=(200, 3)) * [1.0, 1e3, 1e-3] + [0.0, 5e4, -2.0]
    scaler = MinMaxScaler.fit(series, ["a", "b", "c"])
    scaled = scaler.transform(series)
    assert scaled.dtype == np.float64
    np.testing.assert_array_equal(scaled.min(axis=0), 0.0)
    np.testing.assert_allclose(scaled.max(axis=0), 1.0, rtol=0, atol=1e-15)
    # Exact up to float64 rounding: a few ulps of the channel's magnitude.
    ulps = 4 * np.finfo(np.float64).eps * np.abs(series).max(axis=0)
    assert (np.abs(scaler.inverse_transform(scaled) - series) <= ulps).all()
    windows = sliding_windows(scaled, 24)
    assert (np.abs(scaler.inverse_transform(windows)[0] - series[:24]) <= ulps).all()


def test_scaler_constant_column(caplog):
    series = np.stack([np.linspace(0, 1, 10), np.full(10, 7.5)], axis=1)
    with caplog.at_level(logging.WARNING):
        scaler = MinMaxScaler.fit(series, ["ramp", "flat"])
    assert "'flat'" in caplog.text
    scaled = scaler.transform(series)
    assert np.isfinite(scaled).all()
    np.testing.assert_array_equal(scaled[:, 1], 0.0)
    np.testing.assert_array_equal(scaler.inverse_transform(scaled)[:, 1], 7.5)


def test_scaler_dict_round_trip_and_checks():
    import json

    scaler = MinMaxScaler.fit(np.array([[0.1, -3.0], [0.7, 9.0]]))
    assert scaler.columns == ("c0", "c1")
    assert MinMaxScaler.from_dict(json.loads(json.dumps(scaler.to_dict()))) == scaler
    with pytest.raises(ValueError, match="2 channels"):
        scaler.transform(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        MinMaxScaler.fit(np.array([[0.0], [np.nan]]))


# ---- sines ----------------------------------------------------------------------------------------


def test_sines_shape_range_and_seed():
    data = sines(64, length=24, channels=5, seed=3)
    assert data.shape == (64, 24, 5)
    assert data.min() >= 0.0 and data.max() <= 1.0
    np.testing.assert_array_equal(data, sines(64, seed=3))
    assert not np.array_equal(data, sines(64, seed=4))
    # t = 0 gives sin(p) with p in [0, 0.1]: the first step lies in [0.5, (1 + sin 0.1) / 2].
    assert data[:, 0].min() >= 0.5 and data[:, 0].max() <= (1 + np.sin(0.1)) / 2


# ---- features -------------------------------------------------------------------------------------


def test_window_features_shape_and_values():
    length, channels = 24, 2
    t = np.arange(length)
    wave = 0.5 + 0.3 * np.sin(2 * np.pi * 2 * t / length)  # amplitude 0.3 on rFFT bin 2
    windows = np.stack([np.stack([wave, np.full(length, 0.2)], axis=1)] * 3)  # [3, L, 2]
    features = window_features(windows, fft_bins=4)
    assert features.shape == (3, channels * (5 + 4)) and features.dtype == np.float32
    np.testing.assert_array_equal(features, window_features(windows, fft_bins=4))
    mean, std, lo, hi = features[0, 0:2], features[0, 2:4], features[0, 4:6], features[0, 6:8]
    np.testing.assert_allclose(mean, [0.5, 0.2], atol=1e-6)
    np.testing.assert_allclose(std[1], 0.0, atol=1e-6)
    assert lo[0] < mean[0] < hi[0]
    spectrum = features[0, 10:].reshape(channels, 4)  # channel-major bins 1..4
    np.testing.assert_allclose(spectrum[0], [0.0, 0.3, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(spectrum[1], 0.0, atol=1e-6)


# ---- Arrow ----------------------------------------------------------------------------------------


def test_arrow_round_trip_exact(tmp_path):
    windows = np.random.default_rng(0).random((17, 24, 3), dtype=np.float32)
    table = windows_to_table(windows)
    assert table.column_names == ["x"] and table.num_rows == 17
    assert table.schema.field("x").type.list_size == 24 * 3
    np.testing.assert_array_equal(table_to_windows(table), windows)
    pq.write_table(table, tmp_path / "w.parquet")
    np.testing.assert_array_equal(table_to_windows(pq.read_table(tmp_path / "w.parquet")), windows)
    np.testing.assert_array_equal(table_to_windows(table.slice(4, 6)), windows[4:10])


def test_arrow_errors():
    table = windows_to_table(np.zeros((2, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="window_shape"):
        table_to_windows(table.replace_schema_metadata(None))
    with pytest.raises(ValueError, match="no column 'x'"):
        table_to_windows(table.rename_columns(["y"]))
    with pytest.raises(ValueError, match="fixed_size_list<12>"):
        table_to_windows(pa.table({"x": [1.0, 2.0]}).replace_schema_metadata(table.schema.metadata))
