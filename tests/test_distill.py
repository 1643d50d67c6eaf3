"""Distillation on the labelled Gaussian mixture, whose experts and router are closed-form.

The teacher is the analytic full mixture of tests/test_ensemble.py (the marginal velocity). A dense
student trained to match it gets closer with training steps; a reflow student trained on the
teacher's (noise, sample) pairs has straighter paths, so one Euler step lands near where the
teacher's whole trajectory does.
"""

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from archipelago.experts.checkpoint import ema_weights, latest_checkpoint
from archipelago.experts.data import DenseSamples
from archipelago.experts.denoiser import Denoiser
from archipelago.experts.distill import check_student_fields, pairs_batch, straightness, train_student
from archipelago.experts.solvers import integrate
from archipelago.experts.training import TrainConfig
from archipelago.platform import cli, distill, runner, sdk
from archipelago.platform.config import RunConfig
from archipelago.platform.status import run_status, status_text
from tests.test_ensemble import FIELDS, MU, PI, S, analytic_ensemble
from tests.toy_domains import PointSetDomain, VectorDomain


def mixture_data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(PI, n, replacement=True, generator=g)
    return (MU[k] + S[k, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def teacher(x_t, t):
    """The analytic full mixture, in float32 like the student."""
    out = analytic_ensemble("full")({"x": x_t["x"].double()}, t.double())
    return {"x": out["x"].float()}


def config(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=256, lr=3e-3, warmup_steps=20, ema_decay=0.99, progress=False,
                       checkpoint_every=10_000)


def student(folder) -> Denoiser:
    net = VectorDomain().denoiser_network()
    net.load_state_dict(ema_weights(latest_checkpoint(folder)))
    return Denoiser(net, FIELDS).eval()


def velocity_error(model) -> float:
    g = torch.Generator().manual_seed(7)
    x_0 = mixture_data(2048, seed=3)
    t = torch.rand(2048, generator=g) * 0.9 + 0.05
    x_t = (1 - t[:, None]) * x_0 + t[:, None] * torch.randn(2048, 2, generator=g)
    with torch.no_grad():
        want, got = teacher({"x": x_t}, t)["x"], model({"x": x_t}, t)["x"]
    return float(((got - want) ** 2).mean() / (want ** 2).mean())


def test_the_dense_student_approaches_the_ensembles_velocity_with_training(tmp_path):
    domain, data = VectorDomain(), DenseSamples({"x": mixture_data(8192)})
    errors = {}
    for steps in (25, 100, 800):
        train_student(domain, domain, data, config(steps), str(tmp_path / f"dense-{steps}"), teacher=teacher)
        errors[steps] = velocity_error(student(str(tmp_path / f"dense-{steps}")))
    print("relative velocity error against training steps:", errors)
    assert errors[800] < errors[100] < errors[25]
    assert errors[800] < 0.05


def test_reflow_straightens_the_ensembles_paths(tmp_path):
    domain = VectorDomain()
    g = torch.Generator().manual_seed(5)
    noise = {"x": torch.randn(8192, 2, generator=g)}
    with torch.no_grad():
        sample = integrate(teacher, noise, FIELDS, "heun", 40)
    pairs = DenseSamples(pairs_batch(sample, noise, FIELDS))
    train_student(domain, domain, pairs, config(1500), str(tmp_path / "reflow"))
    reflowed = student(str(tmp_path / "reflow"))
    probe = {"x": torch.randn(1024, 2, generator=g)}
    before, after = straightness(teacher, probe, FIELDS), straightness(reflowed, probe, FIELDS)
    with torch.no_grad():
        target = integrate(teacher, probe, FIELDS, "heun", 40)["x"]
        one_step = {name: float(((integrate(m, probe, FIELDS, "euler", 1)["x"] - target) ** 2).mean())
                    for name, m in (("teacher", teacher), ("reflow", reflowed))}
    print(f"straightness {before:.4f} -> {after:.4f}; one Euler step's squared error {one_step}")
    assert after < 0.5 * before
    assert one_step["reflow"] < 0.5 * one_step["teacher"]


def test_a_student_with_other_fields_is_refused_naming_them():
    with pytest.raises(ValueError, match=r"fields do not match.*'label', 'pos', 'x'"):
        check_student_fields(VectorDomain(), PointSetDomain())


# --- the distill step on a run, through the SDK and the command line ---------------------------------

TINY = {"steps": 6, "batch_size": 16, "warmup_steps": 2, "progress": False}
DOMAIN = {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1}
SMALL = {"dense": {**TINY, "steps": 8}, "reflow": {**TINY, "steps": 8}, "pairs": 12, "pairs_per_shard": 5,
         "teacher": {"strategy": "full", "solver": "euler", "steps": 3}}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distill") / "sines"
    return sdk.fit("sines:48", str(run_dir), experts=2, expert=TINY, router=TINY, domain_config=DOMAIN)


def test_distill_writes_resumable_parts_and_students_sample_through_the_request(fitted):
    run = fitted.distill(**SMALL, student={"width": 8})
    students = Path(run.run_dir) / "students"
    shards = sorted(p.name for p in (students / "v1" / "pairs").glob("part-*.parquet"))
    assert shards == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # 5 + 5 + 2 pairs
    assert pq.read_table(students / "v1" / "pairs" / shards[2]).column_names == ["name", "dtype", "shape", "data"]
    saved = json.loads((students / "students.json").read_text())
    assert saved["ensemble_version"] == 1 and saved["config"]["student"] == {"width": 8}
    for model in ("student", "dense"):
        out = run.sample(4, model=model, solver="euler", steps=2)
        assert out.items.shape == (4, 8, 5) and np.isfinite(out.items).all()
        assert out.expert_calls_per_sample == 2 and out.router_calls_per_sample == 0  # one network, no router
        for strategy in ("sample", "oracle", "stochastic", "full"):  # no error: one network routes nothing
            routed = run.sample(4, model=model, solver="euler", steps=2, strategy=strategy)
            assert routed.items.shape == (4, 8, 5) and routed.router_calls_per_sample == 0
    before = (students / "v1" / "pairs" / shards[0]).stat().st_mtime_ns
    fitted.distill(**{**SMALL, "reflow": {**TINY, "steps": 10}}, student={"width": 8})  # resumes: pairs kept
    assert (students / "v1" / "pairs" / shards[0]).stat().st_mtime_ns == before
    assert json.loads((students / "students.json").read_text())["reflow"][-1] == "step-00000010"


def test_the_cli_distils_and_samples_the_student(fitted, tmp_path, capsys, monkeypatch):
    run_dir = shutil.copytree(fitted.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("students"))
    args = ["distill", str(run_dir), "--dense-steps", "4", "--reflow-steps", "4", "--pairs", "6",
            "--teacher-steps", "2", "--in-process", "--no-progress", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--register", "distilled"]
    assert cli.main(args) == 0 and "logged as models:/distilled/1" in capsys.readouterr().out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    model = mlflow.pyfunc.load_model("models:/distilled/1")  # the run's model, its students inside
    assert model.predict({"n": 2, "model": "student", "steps": 2, "solver": "euler"}).shape == (2, 8, 5)
    out = tmp_path / "student.npy"
    assert cli.main(["sample", "--run-dir", str(run_dir), "--model", "student", "-n", "3", "--steps", "2",
                     "--solver", "euler", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert np.load(out).shape == (3, 8, 5) and "(the few-step student, euler" in printed
    assert not (tmp_path / "student.attribution.csv").exists()  # a student's samples have no experts


def test_bad_distillations_are_refused_before_any_work(fitted, tmp_path, capsys):
    unassembled = tmp_path / "partitioned"
    config = RunConfig(data="sines:24", experts=2, domain_config=DOMAIN, expert=TINY, router=TINY)
    runner.prepare(config, str(unassembled), runner.Launch(), source="sines:24")
    with pytest.raises(FileNotFoundError, match="not assembled"):
        distill.distill(str(unassembled), distill.DistillConfig())
    assert not (unassembled / "students").exists()
    with pytest.raises(ValueError, match=r"x \(shape \(4, 5\), the run's \(8, 5\)\)"):  # another window
        distill.check(fitted.run_dir, distill.DistillConfig(student={"window": 4}))
    with pytest.raises(ValidationError, match="steps"):
        distill.DistillConfig(reflow={"steps": 0})
    assert cli.main(["distill", "--run-dir", fitted.run_dir, "--reflow-steps", "0"]) == 2
    assert "--reflow-steps" in capsys.readouterr().err
    assert cli.main(["distill"]) == 2 and "RUN_DIR or --run-dir" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no students yet"):
        sdk.load(str(unassembled)).sample(2, model="student")


def test_resuming_with_other_settings_is_refused_naming_them(fitted, tmp_path):
    run_dir = shutil.copytree(fitted.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("students"))
    distill.distill(str(run_dir), distill.DistillConfig(**SMALL))
    written = sorted((p, p.stat().st_mtime_ns) for p in (run_dir / "students").rglob("*") if p.is_file())
    changes = {"teacher.strategy": {"teacher": {**SMALL["teacher"], "strategy": "sample"}},
               "teacher.steps": {"teacher": {**SMALL["teacher"], "steps": 4}},
               "pairs": {"pairs": 13}, "student.width": {"student": {"width": 8}},
               "reflow.lr": {"reflow": {**TINY, "steps": 8, "lr": 1e-4}}}
    for name, change in changes.items():
        with pytest.raises(distill.steps.RunConflict, match=rf"students/v1 holds a distillation with other "
                                                            rf"settings \(differs in {name}\)"):
            distill.distill(str(run_dir), distill.DistillConfig(**{**SMALL, **change}))
    assert sorted((p, p.stat().st_mtime_ns) for p in (run_dir / "students").rglob("*") if p.is_file()) == written
    # The same teacher spelled with its defaults, and more steps (training goes on), are the same distillation.
    same = {**SMALL, "teacher": {**SMALL["teacher"], "top_k": 2}, "reflow": {**TINY, "steps": 9}}
    distill.distill(str(run_dir), distill.DistillConfig(**same))
    assert (run_dir / "students" / "v1" / "reflow" / "step-00000009").exists()


def test_pairs_are_made_as_ray_tasks_and_match_the_in_process_ones(fitted, tmp_path, ray_local):
    config = distill.DistillConfig(**SMALL)
    runs = {}
    for name, ray in (("ray", True), ("local", False)):
        run_dir = shutil.copytree(fitted.run_dir, tmp_path / name, ignore=shutil.ignore_patterns("students"))
        distill.distill(str(run_dir), config, ray=ray)
        runs[name] = distill.read_pairs(str(run_dir), config, fitted.domain, version=1)
    assert len(runs["ray"]) == 12 and runs["ray"].fingerprint() == runs["local"].fingerprint()  # seeded per shard


def test_a_new_ensemble_version_distils_afresh(fitted, tmp_path):
    run_dir = shutil.copytree(fitted.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("students"))
    run = sdk.load(str(run_dir)).distill(**SMALL)
    run = run.remove_expert(1).distill(**SMALL)  # version 2: one expert left, so new students
    saved = json.loads((run_dir / "students" / "students.json").read_text())
    assert saved["ensemble_version"] == 2 and saved["reflow"][:2] == ["students", "v2"]
    assert (run_dir / "students" / "v1" / "reflow").exists()  # the old version's students are kept as they were
    assert run.sample(3, model="student", solver="euler", steps=1).items.shape == (3, 8, 5)
    assert "students of version 2: dense students/v2/dense/step-00000008" in status_text(run_status(str(run_dir)))


def test_another_seed_repeats_the_distillation_beside_the_first(fitted, tmp_path):
    run_dir = shutil.copytree(fitted.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("students"))
    outcomes = []
    for seed, name in ((0, "v1"), (1, "v1-seed-1")):
        run = sdk.load(str(run_dir)).distill(**{**SMALL, "pairs": 5}, seed=seed)
        pairs = pq.read_table(run_dir / "students" / name / "pairs" / "part-00000.parquet").column("data")
        outcomes.append((pairs.to_pylist(), run.sample(3, model="student", solver="euler", steps=1).items))
        saved = json.loads((run_dir / "students" / "students.json").read_text())
        assert saved["config"]["seed"] == seed and saved["reflow"][:2] == ["students", name]
    assert outcomes[0][0] != outcomes[1][0]
    assert not np.allclose(outcomes[0][1], outcomes[1][1])
    assert (run_dir / "students" / "v1" / "reflow").exists()  # the first distillation is kept
