"""The image benchmark's GPU script (`benchmarks/images_ddm.py --profile gpu`) runs end to end on a CPU at
its reduced sizes: every strategy is sampled, scored and tabulated, and a grid is drawn per model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "images_ddm.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu profile runs at full size (minutes)")
def test_the_gpu_benchmark_runs_reduced_on_a_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("images_ddm", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = script.main(["--profile", "gpu", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "r.json"),
                           "--grids", str(tmp_path / "grids")])
    assert "no GPU" in capsys.readouterr().out
    assert results["args"]["profile"] == "smoke"
    assert set(results["models"]) == {"monolith", *(f"DDM K=4, {label}" for label in script.VARIANTS)}
    for entry in results["models"].values():
        assert entry["scores"]["fid_floor"] >= 0
        assert entry["expert_calls"] >= 2  # 2 Euler steps
        assert [row["guidance"] for row in entry["conditioned"]] == [1.0, 2.0]
    assert json.loads((tmp_path / "r.json").read_text())["models"].keys() == results["models"].keys()
    assert len(list((tmp_path / "grids").glob("smoke-*.png"))) == len(results["models"])
