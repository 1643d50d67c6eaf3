"""Property-based: `archipelago fit` over random settings files and CSV contents (keys, types,
values, cells, encodings, sizes). Every outcome is a success or one of our errors as one line on
stderr (exit 1 or 2, never a traceback), and a failed fit leaves the run directory absent, or,
when it held a finished run, byte for byte unchanged."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archipelago.platform.cli import main

TINY = {"steps": 2, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2, "progress": False}
BASE: dict[str, Any] = {
    "experts": 2,
    "domain_config": {"window": 4, "stride": 2, "width": 8, "depth": 1, "router_width": 8, "router_depth": 1,
                      "heads": 2},
    "expert": dict(TINY),
    "router": dict(TINY),
}
KEYS = ["experts", "seed", "shard_rows", "stream", "prediction", "domain", "data", "expert.steps", "expert.lr",
        "expert.batch_size", "expert.device", "router.steps", "router.ema_decay", "domain_config.window",
        "domain_config.stride", "domain_config.columns", "domain_config.width", "partition.slack",
        "partition.min_size", "partition.balanced", "placement", "expert.stepz", "nonsense", "run_dir"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                                   max_size=2),
)
CELLS = st.one_of(st.floats(-1e6, 1e6), st.integers(-1000, 1000), st.just(float("nan")), st.just(float("inf")),
                  st.sampled_from(["abc", "", " ", "1,5", "1e3", "NaN", "é"]))


@st.composite
def csv_files(draw) -> bytes:
    """A CSV: mostly numbers, sometimes odd cells, names, sizes and encodings; sometimes garbage."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))
    columns = draw(st.lists(st.sampled_from(["a", "b", "c", "a", "", "Ü", "1"]), min_size=1, max_size=3))
    rows = draw(st.integers(0, 40))
    odd = draw(st.integers(0, 2)) == 0
    lines = [",".join(columns)]
    for i in range(rows):
        cells = [draw(CELLS) if odd and draw(st.integers(0, 20)) == 0 else float(np.sin(i / (j + 2)) + j)
                 for j in range(len(columns))]
        lines.append(",".join(str(c) for c in cells))
    return "\n".join(lines).encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"])),
                                   errors="replace")


@st.composite
def settings_texts(draw) -> str:
    """A settings file: the tiny base with random keys set to random values; sometimes not YAML."""
    if draw(st.integers(0, 14)) == 0:
        return draw(st.text(max_size=40))
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=2)):
        *parents, leaf = key.split(".")
        node = raw
        for parent in parents:
            node = node.setdefault(parent, {}) if isinstance(node.get(parent, {}), dict) else {}
        node[leaf] = draw(VALUES)
    return yaml.safe_dump(raw, allow_unicode=True)


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fit(settings_text: str, csv: bytes | Path, work: Path, run_dir: Path, capsys) -> tuple[int, str]:
    """`archipelago fit` of these settings on this CSV (its bytes, or a path) into `run_dir`."""
    (work / "settings.yaml").write_text(settings_text, encoding="utf-8")
    if isinstance(csv, bytes):
        (work / "series.csv").write_bytes(csv)
        csv = work / "series.csv"
    code = main(["fit", str(work / "settings.yaml"), "--data", str(csv), "--run-dir", str(run_dir),
                 "--in-process", "--no-tracking"])
    return code, capsys.readouterr().err


def _check_failure(code: int, err: str) -> None:
    assert code in (1, 2), (code, err)
    lines = [line for line in err.splitlines() if line.startswith("archipelago: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err


PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY
@given(settings_text=settings_texts(), csv=csv_files())
def test_a_fit_into_a_new_directory_succeeds_or_fails_in_one_line_writing_nothing(settings_text, csv, capsys):
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(work) / "run"
        code, err = _fit(settings_text, csv, Path(work), run_dir, capsys)
        if code == 0:
            assert (run_dir / "ensemble.json").exists()
        else:
            _check_failure(code, err)
            assert not run_dir.exists(), sorted(_files(run_dir))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("finished")
    series = "\n".join(["a,b", *(f"{np.sin(i / 3):.4f},{np.cos(i / 5):.4f}" for i in range(40))])
    (work / "series.csv").write_text(series)
    (work / "settings.yaml").write_text(yaml.safe_dump(BASE))
    code = main(["fit", str(work / "settings.yaml"), "--data", str(work / "series.csv"), "--run-dir",
                 str(work / "run"), "--in-process", "--no-tracking"])
    assert code == 0
    return work / "run"


@PROPERTY
@given(settings_text=settings_texts(), csv=csv_files(), same_data=st.booleans())
def test_a_failed_fit_into_a_finished_run_changes_no_file(settings_text, csv, same_data, finished_run, capsys):
    csv = finished_run.parent / "series.csv" if same_data else csv  # the run's own data: deeper checks run
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(work) / "run"
        shutil.copytree(finished_run, run_dir)
        before = _files(run_dir)
        code, err = _fit(settings_text, csv, Path(work), run_dir, capsys)
        if code != 0:
            _check_failure(code, err)
            assert _files(run_dir) == before
