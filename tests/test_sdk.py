"""The SDK from data to samples on the time-series domain, and every bad input of the core issue."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from archipelago.domains.timeseries.domain import TimeSeriesDomain
from archipelago.experts.training import CheckpointMismatch
from archipelago.platform import sdk
from archipelago.platform.status import run_status
from archipelago.platform.steps import RunConflict

TINY = {"steps": 6, "batch_size": 16, "warmup_steps": 2, "progress": False}
DOMAIN = {"width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1}


def series(rows=80, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    return pd.DataFrame({"date": pd.date_range("2020-01-01", periods=rows).astype(str),
                         "open": 100 + np.cumsum(rng.normal(size=rows)), "volume": 1e6 + 1e4 * np.sin(t / 5),
                         "close": 50 + np.sin(t / 3)})


def fit(data, run_dir, **kwargs):
    options = {"experts": 2, "expert": TINY, "router": TINY, "domain_config": {"window": 8, **DOMAIN}} | kwargs
    return sdk.fit(data, str(run_dir), **options)


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prices.csv"
    series().to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def run(csv, tmp_path_factory):
    return fit(str(csv), tmp_path_factory.mktemp("runs") / "prices")


@pytest.mark.parametrize("strategy", ["full", "topk", "top1", "sample", "oracle"])
def test_samples_come_back_in_user_units(run, strategy):
    out = run.sample(5, strategy=strategy, solver="euler", steps=3)
    assert out.items.shape == (5, 8, 3)
    expected = {"full": 2, "topk": 2, "top1": 1, "sample": 1, "oracle": 1}[strategy]
    assert out.expert_calls_per_sample == 3 * expected
    frames = run.domain.decode_frames(out.batch)
    assert list(frames[0].columns) == ["open", "volume", "close"]
    assert (out.items[..., 1] > 9e5).all()  # volume is back in its own units


def test_a_new_process_loads_the_run_and_samples(run):
    code = ("from archipelago.platform import sdk; import sys; r = sdk.load(sys.argv[1]);"
            "o = r.sample(4, strategy='top1', steps=2); print(o.items.shape)")
    out = subprocess.run([sys.executable, "-c", code, run.run_dir], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(4, 8, 3)"


def min_max_windows(frame, low, high, window=8):
    """Sliding windows [N, window, C] of a frame's numeric columns scaled by hand to low..high -> 0..1."""
    scaled = (frame[["open", "volume", "close"]].to_numpy() - low) / (high - low)
    return np.lib.stride_tricks.sliding_window_view(scaled, window, axis=0).transpose(0, 2, 1)


def as_samples(windows):
    batch = {"x": torch.tensor(np.array(windows), dtype=torch.float32)}
    return sdk.Samples(items=windows, batch=batch, strategy="given", expert_calls_per_sample=0.0,
                       router_calls_per_sample=0.0)


def test_evaluate_against_held_out_data_scaled_like_training(run, tmp_path):
    """A held-out slice of the training series spans less than the whole, so scaling it with its own
    min and max would stretch it; evaluate must scale it with the training scaler instead."""
    training = series()
    columns = ["open", "volume", "close"]
    low, high = training[columns].min().to_numpy(), training[columns].max().to_numpy()
    held_out = training.iloc[20:60]
    path = tmp_path / "held_out.csv"
    held_out.to_csv(path, index=False)
    like_training = min_max_windows(held_out, low, high)
    own_low, own_high = held_out[columns].min().to_numpy(), held_out[columns].max().to_numpy()
    refitted = min_max_windows(held_out, own_low, own_high)
    assert like_training.min() >= 0 and like_training.max() <= 1 and len(like_training) == 40 - 8 + 1

    def vds(samples):
        return run.evaluate(samples, real=str(path), metrics=["vds"], repeats=2, vds={"positions": 500})["vds"]

    same = vds(as_samples(like_training))
    assert same.mean == pytest.approx(0.0, abs=1e-6) and len(same.values) == 2
    assert vds(as_samples(refitted)).mean > 0.01  # what a refitted scaler would have compared with
    assert vds(run.sample(33, steps=2)).mean > 0.01  # and generated windows are not the held-out ones


def test_run_directory_layout(run):
    root = Path(run.run_dir)
    assert sorted(p.name for p in (root / "data").iterdir()) == ["expert=0", "expert=1"]
    saved = json.loads((root / "domain.json").read_text())
    assert saved["config"]["scaler"]["columns"] == ["open", "volume", "close"]
    ensemble = json.loads((root / "ensemble.json").read_text())
    assert sum(ensemble["cluster_sizes"]) == 80 - 8 + 1


def files_of(root):
    """Every file under root: its (mtime, bytes)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(root).rglob("*")
            if p.is_file()}


def test_refitting_the_same_run_resumes_instead_of_retraining(csv, run):
    before = files_of(run.run_dir)
    expected = run.sample(4, solver="euler", steps=2, seed=3).items
    again = fit(str(csv), run.run_dir)
    after = files_of(run.run_dir)
    assert sorted(after) == sorted(before)  # no new checkpoint step, nothing else added
    assert {name: content for name, (_, content) in after.items()} == {n: c for n, (_, c) in before.items()}
    # Only the settings (run.json) and the ensemble (ensemble.json) are rewritten, with the same bytes;
    # no checkpoint, partition or record is written again.
    touched = sorted(name for name in before if after[name][0] != before[name][0])
    assert set(touched) <= {"run.json", "ensemble.json"}, touched
    assert [(e["step"], e["state"]) for e in run_status(again.run_dir)["experts"]] == [(6, "done")] * 2
    assert run_status(again.run_dir)["router"]["step"] == 6
    np.testing.assert_array_equal(again.sample(4, solver="euler", steps=2, seed=3).items, expected)


def test_a_run_directory_with_a_different_run_is_refused(csv, run):
    with pytest.raises(RunConflict, match=r"differs in experts"):
        fit(str(csv), run.run_dir, experts=3)


def test_non_numeric_columns_are_skipped_and_logged(csv, caplog):
    domain = TimeSeriesDomain(window=8)
    with caplog.at_level(logging.WARNING):
        domain.ingest(str(csv))
    assert "date" in caplog.text and domain.scaler.columns == ("open", "volume", "close")


def test_a_chosen_non_numeric_column_is_an_error(csv, tmp_path):
    with pytest.raises(ValueError, match="date"):
        fit(str(csv), tmp_path / "r", domain_config={"window": 8, "columns": ["open", "date"], **DOMAIN})
    assert not (tmp_path / "r").exists()


def test_nan_values_name_the_file_and_column(tmp_path):
    frame = series()
    frame.loc[7, "close"] = np.nan
    path = tmp_path / "holes.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"holes\.csv.*close"):
        fit(str(path), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_infinite_values_are_an_error(tmp_path):
    frame = series()
    frame.loc[3, "open"] = np.inf
    with pytest.raises(ValueError, match="open"):
        fit(frame, tmp_path / "r")


def test_fewer_rows_than_one_window(tmp_path):
    path = tmp_path / "short.csv"
    series(rows=5).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"short\.csv.*5 rows.*window of length 8"):
        fit(str(path), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_constant_column_is_kept_and_decodes_to_its_constant(tmp_path, caplog):
    frame = series().assign(flat=3.5)
    with caplog.at_level(logging.WARNING):
        run = fit(frame, tmp_path / "r")
    assert "flat" in caplog.text
    assert np.allclose(run.sample(2, steps=2).items[..., 3], 3.5)


def test_more_experts_than_windows_is_an_error_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="experts=80 is larger than the 73 records"):
        fit(series(), tmp_path / "r", experts=80)
    assert not (tmp_path / "r").exists()


def test_unknown_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="stepz"):
        fit(series(), tmp_path / "r", expert={"stepz": 3})
    with pytest.raises(ValueError, match="windw"):
        fit(series(), tmp_path / "r", domain_config={"windw": 8})


def test_a_checkpoint_from_another_config_is_refused(csv, run):
    from archipelago.platform import steps

    config = steps.load_config(run.run_dir)
    changed = config.model_copy(update={"expert": config.expert.model_copy(update={"lr": 0.5})})
    (Path(run.run_dir) / "run.json").write_text(json.dumps({"config": changed.model_dump(mode="json")}))
    try:
        with pytest.raises(CheckpointMismatch, match="lr: checkpoint 0.001 vs now 0.5"):
            steps.train_expert_step(run.run_dir, 0)
    finally:
        (Path(run.run_dir) / "run.json").write_text(json.dumps({"config": config.model_dump(mode="json")}))
