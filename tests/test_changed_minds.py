"""Changed minds and data matched by name: more steps on a finished run train on and reassemble,
fewer are refused; a deleted partition is rebuilt; held-out data is matched to the run's columns by
name; a stray text cell in a numeric column is named; --top-k above K is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from archipelago.experts.checkpoint import latest_checkpoint, load_checkpoint
from archipelago.platform import sdk, steps
from archipelago.platform.cli import main
from archipelago.router.sampling import SampleRequest
from tests.toy_domains import VectorDomain

TINY = {"batch_size": 16, "warmup_steps": 1, "checkpoint_every": 2, "progress": False}


def _vectors(n: int = 64) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)


def _fit(run_dir: Path, expert_steps: int = 4, router_steps: int = 4) -> sdk.Run:
    return sdk.fit(_vectors(), str(run_dir), domain=VectorDomain(), experts=2,
                   expert={**TINY, "steps": expert_steps}, router={**TINY, "steps": router_steps})


def _files(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_raising_steps_on_a_finished_run_trains_on_and_reassembles(tmp_path):
    run_dir = tmp_path / "run"
    _fit(run_dir)
    _fit(run_dir, expert_steps=6, router_steps=8)
    ensemble = json.loads((run_dir / "ensemble.json").read_text())
    assert [parts[-1] for parts in ensemble["experts"]] == ["step-00000006", "step-00000006"]
    assert ensemble["router"][-1] == "step-00000008"
    saved = steps.load_config(str(run_dir))
    assert (saved.expert.steps, saved.router.steps) == (6, 8)


@pytest.mark.parametrize("key", ["expert", "router"])
def test_lowering_steps_is_refused_and_changes_no_file(tmp_path, key):
    run_dir = tmp_path / "run"
    _fit(run_dir)
    before = _files(run_dir)
    with pytest.raises(steps.RunConflict, match=f"{key}.steps=2 is lower than the 4 steps"):
        _fit(run_dir, **{f"{key}_steps": 2})
    assert _files(run_dir) == before


def test_partition_rebuilds_a_deleted_partition_and_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _fit(run_dir)
    before, records = _files(run_dir), steps.expert_records(str(run_dir), 0)
    for shard in (run_dir / "data" / "expert=0").iterdir():
        shard.unlink()
    assert main(["partition", "--run-dir", str(run_dir)]) == 0
    assert "rebuilt the missing partition data/expert=0" in capsys.readouterr().out
    assert steps.expert_records(str(run_dir), 0).equals(records)
    after = _files(run_dir)
    assert {k: v for k, v in after.items() if "expert=0" not in k} == {k: v for k, v in before.items()
                                                                       if "expert=0" not in k}
    assert main(["train-expert", "--run-dir", str(run_dir), "--expert", "0"]) == 0  # same data fingerprint


def test_top_k_above_the_number_of_experts_is_an_error(tmp_path, capsys):
    run = _fit(tmp_path / "run")
    with pytest.raises(ValueError, match="top_k 3 is more than the 2 experts"):
        run.sample(SampleRequest(n=4, strategy="topk", top_k=3))
    out = tmp_path / "s.npy"
    code = main(["sample", "--run-dir", run.run_dir, "-n", "4", "--strategy", "topk", "--top-k", "3",
                 "--out", str(out)])
    assert code == 1 and "top_k 3 is more than the 2 experts" in capsys.readouterr().err and not out.exists()
    assert run.sample(SampleRequest(n=4, strategy="topk", top_k=2)).batch["x"].shape == (4, 2)


# --- time series: columns by name, stray text cells -------------------------------------------------


def _series(columns: list[str], rows: int = 120) -> pd.DataFrame:
    t = np.arange(rows, dtype=np.float64)
    return pd.DataFrame({c: np.sin(t / (i + 3)) + i for i, c in enumerate(columns)})


@pytest.fixture(scope="module")
def series_run(tmp_path_factory) -> sdk.Run:
    return sdk.fit(_series(["a", "b", "c"]), str(tmp_path_factory.mktemp("ts") / "run"), experts=2,
                   domain_config={"window": 8, "stride": 4, "width": 16, "depth": 1, "router_width": 16,
                                  "router_depth": 1},
                   expert={**TINY, "steps": 2}, router={**TINY, "steps": 2})


def test_held_out_series_are_matched_to_the_runs_columns_by_name(series_run):
    frame = _series(["a", "b", "c"])
    in_order = series_run.domain.ingest(frame, fit=False)
    reordered = series_run.domain.ingest(frame[["c", "a", "b"]], fit=False)
    assert in_order.equals(reordered)
    with pytest.raises(ValueError, match=r"missing \['c'\]"):
        series_run.domain.ingest(frame[["a", "b"]], fit=False)
    with pytest.raises(ValueError, match=r"columns \['d'\] are not among the run's columns"):
        series_run.domain.ingest(frame.assign(d=1.0), fit=False)
    with pytest.raises(ValueError, match=r"no column 'c'"):
        series_run.domain.ingest(frame.rename(columns={"c": "z"}), fit=False)
    assert series_run.domain.ingest(frame.assign(date="2020-01-01"), fit=False).equals(in_order)  # text: skipped


def test_evaluate_refuses_renamed_columns(series_run, tmp_path):
    generated = series_run.sample(8)
    real = tmp_path / "real.csv"
    _series(["a", "b", "z"]).to_csv(real, index=False)
    with pytest.raises(ValueError, match=f"{real}: no column 'c'"):
        series_run.evaluate(generated, str(real), metrics=["correlational"], progress=False)


def test_a_stray_text_cell_in_a_numeric_column_is_named(tmp_path):
    frame = _series(["a", "b"]).astype(object)
    frame.loc[17, "b"] = "abc"
    path = tmp_path / "series.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"column 'b' holds numbers but row 17 .* is 'abc'"):
        sdk.fit(str(path), str(tmp_path / "run"), experts=2, expert={**TINY, "steps": 1})
    assert not (tmp_path / "run").exists()


def test_raised_steps_continue_the_run_bit_for_bit(tmp_path):
    """4 steps, then raised to 6: the same expert weights as 6 steps in one go (it resumed)."""
    _fit(tmp_path / "raised")
    _fit(tmp_path / "raised", expert_steps=6)
    _fit(tmp_path / "direct", expert_steps=6)
    for k in range(2):
        raised, direct = (load_checkpoint(latest_checkpoint(steps.expert_dir(str(tmp_path / name), k))).model
                          for name in ("raised", "direct"))
        assert all(torch.equal(raised[key], direct[key]) for key in direct)


def test_add_data_with_other_columns_is_refused_and_changes_no_file(series_run):
    from archipelago.platform import modules

    before = _files(Path(series_run.run_dir))
    with pytest.raises(ValueError, match=r"missing \['c'\]"):
        modules.add_data(series_run.run_dir, _series(["a", "b"]))
    with pytest.raises(ValueError, match=r"columns \['d'\] are not among the run's columns"):
        modules.add_data(series_run.run_dir, _series(["a", "b", "c", "d"]), new_partitions=1)
    assert _files(Path(series_run.run_dir)) == before
