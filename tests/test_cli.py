"""The command line: help, dry runs, one-line errors with exit code 2 for bad settings, preflight
failures that write nothing, and a tiny fit followed by sample (in a fresh process), status and
evaluate. Commands run in process through `main(argv)` except where a fresh process is the point."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from archipelago.domains.timeseries.data import table_to_windows
from archipelago.domains.timeseries.metrics import correlational
from archipelago.platform import sdk
from archipelago.platform.cli import main

ARCHIPELAGO = str(Path(sys.executable).with_name("archipelago"))  # the console script of this venv
TINY = {"steps": 4, "batch_size": 16, "warmup_steps": 1, "progress": False}
SETTINGS = {
    "data": "sines:200",
    "experts": 2,
    "domain_config": {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1},
    "expert": TINY,
    "router": TINY,
}
COMMANDS = ["fit", "partition", "train-expert", "train-router", "assemble", "sample", "evaluate", "status", "submit",
            "add-data", "remove-expert", "diagnose"]


def write_settings(folder: Path, text: str | None = None, **changes) -> Path:
    path = folder / "run.yaml"
    path.write_text(
        text if text is not None else yaml.safe_dump({"run_dir": str(folder / "run"), **SETTINGS, **changes})
    )
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("archipelago"), lines
    assert "error:" in lines[0]
    return lines[0]


def closed_port() -> int:
    with socket.socket() as probe:  # nothing listens there once the probe is closed
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --- help and dry runs ----------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under folder with its (mtime, size)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def dry_runs(run_dir: Path, settings: Path, out: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per command: the argv of its dry run on a fitted run (or its settings) and what its plan must say."""
    run = str(run_dir)
    dashboard = "http://127.0.0.1:8265"  # never contacted by a dry run
    return {
        "fit": (["fit", str(settings)], ["# plan", f"run directory: {run}", "expert 1: 4 steps of batch 16"]),
        "partition": (["partition", str(settings)], [f"check, ingest and partition into {run}"]),
        "partition --run-dir": (["partition", "--run-dir", run], [f"partition {run}"]),
        "train-expert": (
            ["train-expert", "--run-dir", run, "--expert", "1"],
            [f"train expert 1 for 4 steps into {run_dir / 'experts' / 'expert-1'}, in this process, untracked"],
        ),
        "train-router": (
            ["train-router", "--run-dir", run, "--parent-run-id", "abc123"],
            [f"train the router for 4 steps into {run_dir / 'router'}", "tracked as a child of MLflow run abc123"],
        ),
        "assemble": (["assemble", "--run-dir", run], [f"write ensemble.json in {run} from the latest checkpoints"]),
        "sample": (
            ["sample", "--run-dir", run, "-n", "5", "--strategy", "topk", "--steps", "3", "--out", str(out)],
            ['"n":5', '"strategy":"topk"', '"steps":3', f"write {out}"],
        ),
        "evaluate": (
            ["evaluate", "--run-dir", run, "--samples", str(out), "--metrics", "vds", "--repeats", "2"],
            [f"score {out} against the run's own records with metrics ['vds'], 2 repeats, seed 0"],
        ),
        "status": (["status", "--run-dir", run], [f"checkpoints and ensemble.json of {run}"]),
        "add-data": (["add-data", "--run-dir", run, "--data", "sines:64", "--new-partitions", "1"],
                     [f"add the records of sines:64 to {run} into 1 new partitions"]),
        "remove-expert": (["remove-expert", "--run-dir", run, "--expert", "1"], [f"delete expert 1 of {run}"]),
        "diagnose": (["diagnose", "--run-dir", run, "--records", "64"], [f"up to 64 records of {run}"]),
        "submit": (["submit", str(settings), "--address", dashboard], ["submission id: archipelago-", dashboard]),
    }


def test_every_command_has_help_and_a_dry_run_below(capsys) -> None:
    assert {argv[0] for argv, _ in dry_runs(Path("r"), Path("s"), Path("o")).values()} == set(COMMANDS)
    for command in COMMANDS:
        assert main([command, "--help"]) == 0 and "--dry-run" in capsys.readouterr().out


@pytest.mark.parametrize("case", list(dry_runs(Path("r"), Path("s"), Path("o"))))
def test_dry_runs_print_the_plan_and_write_nothing(case: str, fitted, tmp_path, monkeypatch, capsys) -> None:
    run_dir, _ = fitted
    monkeypatch.chdir(tmp_path)  # MLflow's default store would be ./mlflow.db
    settings, out = write_settings(tmp_path, run_dir=str(run_dir)), tmp_path / "samples.npy"
    argv, expected = dry_runs(run_dir, settings, out)[case]
    before = snapshot(run_dir)
    assert main([*argv, "--dry-run"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "# plan\n" in printed
    for text in expected:
        assert text in printed, (text, printed)
    assert snapshot(run_dir) == before and written(tmp_path) == ["run.yaml"]


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["train-expert", "--expert", "2"], "experts 0..1"),
        (["sample", "-n", "0", "--out", "x.npy"], "-n: Input should be greater than or equal to 1"),
        (["sample", "--out", "x.txt"], ".txt"),
        (["fit", "--set", "expert.stepz=3"], "expert.stepz: unknown key"),
    ],
)
def test_dry_runs_still_refuse_bad_settings(argv, problem, fitted, tmp_path, monkeypatch, capsys) -> None:
    run_dir, _ = fitted
    monkeypatch.chdir(tmp_path)
    where = [str(write_settings(tmp_path, run_dir=str(run_dir)))] if argv[0] == "fit" else ["--run-dir", str(run_dir)]
    before = snapshot(run_dir)
    assert main([argv[0], *where, *argv[1:], "--dry-run"]) == 2
    assert problem in one_line_error(capsys) and "# plan" not in capsys.readouterr().out
    assert snapshot(run_dir) == before
    assert main(["sample", "--run-dir", str(tmp_path / "none"), "--out", "x.npy", "--dry-run"]) == 1
    assert "none" in one_line_error(capsys)


def test_fit_dry_run_prints_settings_and_plan_and_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow's default store would be ./mlflow.db
    settings = write_settings(tmp_path, placement=[{"island": "a"}, {"island": "b", "num_cpus": 2}])
    assert main(["fit", str(settings), "--dry-run", "--set", "expert.steps=7", "--experts", "2"]) == 0
    resolved, plan = capsys.readouterr().out.split("# plan\n")
    resolved = yaml.safe_load(resolved)
    assert resolved["expert"]["steps"] == 7 and resolved["router"]["steps"] == 4
    assert resolved["run_dir"] == str(tmp_path / "run") and resolved["island_wait_s"] == 60
    assert "expert 0: 7 steps of batch 16, island a, 1 CPU" in plan and "expert 1: 7 steps" in plan
    assert "island b, 2 CPU" in plan and "ray: embedded" in plan and "mlflow.db" in plan
    assert written(tmp_path) == ["run.yaml"]


def test_submit_dry_run_gives_a_deterministic_id_and_a_job_that_resolves_alike(tmp_path, capsys) -> None:
    settings = str(write_settings(tmp_path))
    address, uri = "http://127.0.0.1:8265", f"sqlite:///{tmp_path}/mlflow.db"

    def plan(*extra: str) -> dict[str, str]:
        assert main(["submit", settings, "--address", address, "--tracking-uri", uri, "--dry-run", *extra]) == 0
        lines = capsys.readouterr().out.split("# plan\n")[1].splitlines()
        return dict(line.split(": ", 1) for line in lines)

    first = plan()
    assert first["submission id"] == plan()["submission id"] != plan("--set", "expert.steps=5")["submission id"]
    assert first["entrypoint"].startswith("archipelago fit --config-json ") and uri in first["env"]
    job_settings = first["entrypoint"].removeprefix("archipelago fit --config-json ")
    assert main(["fit", "--config-json", job_settings, "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out.split("# plan\n")[0])
    assert resolved["expert"] == {**resolved["expert"], **TINY} and resolved["address"] is None
    assert written(tmp_path) == ["run.yaml"]


# --- bad settings: one line, exit code 2, nothing written -----------------------------------------


# Each case: changes to the tiny settings, or the whole file's text, extra flags, and what the line names.
BAD_SETTINGS = {
    "unknown key": ({"expert": {**TINY, "stepz": 3}}, [], "expert.stepz: unknown key"),
    "unknown top-level key": ({"learning_rate": 0.1}, [], "learning_rate: unknown key"),
    "unknown domain": ({"domain": "imagez"}, [], "unknown domain 'imagez'"),
    "bad domain key": ({"domain_config": {"windw": 8}}, [], "windw"),
    "bad value": ({"experts": 0}, [], "experts: Input should be greater than or equal to 1"),
    "YAML syntax": ("expert: {steps: 4\n", [], "invalid YAML"),
    "not a mapping": ("- 1\n- 2\n", [], "a config file holds a mapping"),
    "unknown key by --set": ({}, ["--set", "router.lrr=0.1"], "router.lrr: unknown key"),
    "bad --set": ({}, ["--set", "expert.steps"], "expected dotted.key=value"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_settings_are_one_line_and_exit_2(case: str, tmp_path, capsys) -> None:
    content, flags, problem = BAD_SETTINGS[case]
    settings = write_settings(tmp_path, content) if isinstance(content, str) else write_settings(tmp_path, **content)
    assert main(["fit", str(settings), "--in-process", "--no-tracking", *flags]) == 2
    line = one_line_error(capsys)
    assert problem in line and (str(settings) in line or "--set" in line)
    assert written(tmp_path) == ["run.yaml"]


def test_missing_settings_file_and_missing_run_dir_exit_2(tmp_path, capsys) -> None:
    assert main(["fit", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in one_line_error(capsys)
    assert main(["fit", "--data", "sines:100"]) == 2
    assert "no run_dir" in one_line_error(capsys)


def test_unknown_strategy_names_the_choices(tmp_path, capsys) -> None:
    assert main(["sample", "--run-dir", str(tmp_path), "--strategy", "best", "--out", "x.npy"]) == 2
    line = one_line_error(capsys)
    assert "'best'" in line and "top1" in line and "oracle" in line
    assert main(["sample", "--run-dir", str(tmp_path), "-n", "0", "--out", "x.npy"]) == 2
    assert "-n: Input should be greater than or equal to 1 (got 0)" in one_line_error(capsys)


# --- preflight failures: a one-line error (exit 1) and nothing in the run directory ---------------


def test_an_island_with_no_node_fails_before_anything_is_written(ray_local: None, tmp_path, capsys) -> None:
    settings = write_settings(tmp_path, placement=[{"island": "nowhere"}, {"island": "nowhere"}])
    assert main(["fit", str(settings), "--no-tracking", "--island-wait", "0.5"]) == 1
    assert "'nowhere'" in one_line_error(capsys)
    assert written(tmp_path / "run") == []


@pytest.mark.parametrize("problem", ["ray address", "tracking uri", "unwritable run dir"])
def test_preflight_failures_write_nothing(problem: str, tmp_path, capsys) -> None:
    url = f"127.0.0.1:{closed_port()}"
    flags, expected = {
        "ray address": (["--address", url, "--no-tracking"], url),
        "tracking uri": (["--in-process", "--tracking-uri", f"http://{url}"], url),
        "unwritable run dir": (
            ["--in-process", "--no-tracking", "--run-dir", "/proc/archipelago-test/run"],
            "/proc/archipelago-test/run",
        ),
    }[problem]
    settings = write_settings(tmp_path)
    assert main(["fit", str(settings), *flags]) == 1
    assert expected in one_line_error(capsys)
    assert written(tmp_path / "run") == [] and not Path("/proc/archipelago-test").exists()


# --- a tiny fit, then every other command on it ---------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tracked in-process fit through the command line: (run directory, tracking URI)."""
    folder = tmp_path_factory.mktemp("cli-fit")
    uri = f"sqlite:///{folder}/mlflow.db"
    assert main(["fit", str(write_settings(folder)), "--in-process", "--tracking-uri", uri, "--experiment", "cli"]) == 0
    return folder / "run", uri


def test_fit_is_tracked_as_one_parent_with_three_children(fitted) -> None:
    _, uri = fitted
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["expert-0", "expert-1", "router"]


def test_sample_in_a_fresh_process_writes_windows(fitted, tmp_path) -> None:
    run_dir, _ = fitted
    out = tmp_path / "samples.npy"
    command = [
        ARCHIPELAGO,
        "sample",
        "--run-dir",
        str(run_dir),
        "-n",
        "6",
        "--steps",
        "3",
        "--solver",
        "euler",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.load(out).shape == (6, 8, 5)
    assert "evaluations per sample: 3 expert, 1 router" in done.stdout  # the default, sample: the router once


def test_sample_as_a_long_table(fitted, tmp_path, capsys) -> None:
    run_dir, _ = fitted
    out = tmp_path / "samples.csv"
    assert (
        main(["sample", "--run-dir", str(run_dir), "-n", "3", "--steps", "2", "--strategy", "full", "--out", str(out)])
        == 0
    )
    table = pd.read_csv(out)
    assert list(table.columns) == ["sample", "step", "sine0", "sine1", "sine2", "sine3", "sine4"]
    assert len(table) == 3 * 8 and "6 expert, 3 router" in capsys.readouterr().out  # full: 2 experts, heun 2 + 1 calls
    assert main(["sample", "--run-dir", str(run_dir), "--out", str(tmp_path / "x.txt")]) == 2
    assert ".txt" in one_line_error(capsys)


def test_status_reads_progress_from_storage(fitted, capsys) -> None:
    run_dir, _ = fitted
    assert main(["status", "--run-dir", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [(e["step"], e["steps"], e["state"]) for e in status["experts"]] == [(4, 4, "done")] * 2
    assert status["router"]["state"] == "done" and status["assembled"] is True
    assert sum(status["partition_sizes"]) == 200
    assert main(["status", "--run-dir", str(run_dir)]) == 0
    assert "expert 1" in capsys.readouterr().out


def test_evaluate_prints_mean_and_interval(fitted, tmp_path, capsys) -> None:
    run_dir, _ = fitted
    samples = tmp_path / "samples.npy"
    assert main(["sample", "--run-dir", str(run_dir), "-n", "8", "--steps", "2", "--out", str(samples)]) == 0
    capsys.readouterr()
    args = [
        "evaluate",
        "--run-dir",
        str(run_dir),
        "--samples",
        str(samples),
        "--metrics",
        "correlational",
        "--repeats",
        "2",
    ]
    assert main([*args, "--json"]) == 0
    score = json.loads(capsys.readouterr().out)["correlational"]
    # The same numbers as the metric itself on the run's records and the samples (sines: identity scaler).
    records = table_to_windows(sdk.load(str(run_dir)).records())
    expected = correlational(np.asarray(records, np.float64), np.load(samples), repeats=2, seed=0)
    assert score == pytest.approx({"mean": expected.mean, "interval": expected.interval}, rel=1e-9)
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["correlational", f"{expected.mean:.4f}", f"{expected.interval:.4f}"]


def test_evaluate_scores_the_runs_own_records_near_zero(fitted, tmp_path, capsys) -> None:
    """Records written as a samples file score ~0 against the records; the tiny model's samples do not."""
    run_dir, _ = fitted
    own, generated = tmp_path / "own.npy", tmp_path / "generated.npy"
    np.save(own, table_to_windows(sdk.load(str(run_dir)).records()))
    assert main(["sample", "--run-dir", str(run_dir), "-n", "64", "--steps", "2", "--out", str(generated)]) == 0
    capsys.readouterr()

    def vds(samples: Path) -> float:
        args = ["--metrics", "vds", "--repeats", "1", "--json"]
        assert main(["evaluate", "--run-dir", str(run_dir), "--samples", str(samples), *args]) == 0
        return json.loads(capsys.readouterr().out)["vds"]["mean"]

    same, far = vds(own), vds(generated)
    assert same == pytest.approx(0.0, abs=1e-6) and far > 0.01, (same, far)


def test_a_different_run_in_the_run_directory_is_refused_unchanged(fitted, tmp_path, capsys) -> None:
    run_dir, _ = fitted
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    settings = write_settings(tmp_path, experts=3, run_dir=str(run_dir))
    assert main(["fit", str(settings), "--in-process", "--no-tracking"]) == 1
    assert "differs in experts" in one_line_error(capsys)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


# --- the steps one by one -------------------------------------------------------------------------


def test_the_steps_one_by_one(tmp_path, capsys) -> None:
    settings = write_settings(tmp_path)
    run_dir = str(tmp_path / "run")
    assert main(["partition", str(settings), "--dry-run"]) == 0
    assert "check, ingest and partition" in capsys.readouterr().out and written(tmp_path) == ["run.yaml"]
    assert main(["partition", str(settings)]) == 0
    assert main(["train-expert", "--run-dir", run_dir, "--expert", "2"]) == 2
    assert "experts 0..1" in one_line_error(capsys)
    assert main(["assemble", "--run-dir", run_dir]) == 1
    assert "2 expert(s) not done: expert 0 (no island, pending, step 0 of 4)" in one_line_error(capsys)
    for k in ("0", "1"):
        assert main(["train-expert", "--run-dir", run_dir, "--expert", k]) == 0
    assert "expert-1: 4 steps" in capsys.readouterr().out
    assert main(["status", "--run-dir", run_dir, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["router"]["state"] == "not started"
    assert main(["train-router", "--run-dir", run_dir]) == 0
    assert main(["assemble", "--run-dir", run_dir]) == 0
    assert (tmp_path / "run" / "ensemble.json").exists()


def test_module_entry_point(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "archipelago.platform.cli", "status", "--run-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stderr.strip().startswith("archipelago: error:")
    assert "not a run directory" in done.stderr
