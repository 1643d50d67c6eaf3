"""Experts as modules on a planted partition: three well separated blobs, one of them the planted
cluster. Forgetting it removes its share of the samples and every file of its data; adding it back
as a new partition restores the share and leaves the other experts' files as they were; samples
are attributed to the experts that made them; every ensemble version is kept and loadable unless
withdrawn. The attribution is also checked against the analytic posterior on the Gaussian mixture."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from archipelago.experts.solvers import integrate
from archipelago.platform import modules, sdk, steps, versions
from archipelago.platform.cli import main
from archipelago.platform.status import run_status
from archipelago.router.partition import Partition
from tests.test_ensemble import FIELDS, MU, PI, analytic_ensemble, analytic_posterior, marginal_velocity
from tests.toy_domains import VectorDomain

CENTERS = np.array([[-5.0, 0.0], [5.0, 0.0], [0.0, 9.0]])  # the last blob is the planted cluster
TRAIN = {"steps": 300, "batch_size": 32, "warmup_steps": 10, "checkpoint_every": 100, "progress": False, "lr": 3e-3}


def _blobs(which: list[int], n: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(scale=0.6, size=(n, 2)) + CENTERS[c] for c in which]).astype(np.float32)


def _fit(run_dir: Path, which: list[int]) -> sdk.Run:
    return sdk.fit(_blobs(which), str(run_dir), domain=VectorDomain(), experts=len(which), expert=TRAIN,
                   router=TRAIN)


def _shares(run: sdk.Run, n: int = 400) -> np.ndarray:
    """The share of generated samples nearest to each blob center (the planted one last)."""
    x = run.sample(n, strategy="full", steps=30).batch["x"].numpy()
    return np.bincount(((x[:, None, :] - CENTERS[None]) ** 2).sum(-1).argmin(1), minlength=3) / n


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _planted_expert(run_dir: Path) -> int:
    summary = json.loads((run_dir / "partition.json").read_text())
    centroids = Partition(np.zeros(0, int), np.asarray(summary["centroids"]), np.asarray(summary["mean"]),
                          np.asarray(summary["scale"]))
    return int(np.bincount(centroids.assign(_blobs([2], n=16))).argmax())


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("modules") / "three"
    _fit(run_dir, [0, 1, 2])
    return run_dir


def test_remove_expert_forgets_the_planted_partition(three, tmp_path):
    run_dir = tmp_path / "run"
    _copy(three, run_dir)
    before = _shares(sdk.load(str(run_dir)))
    assert before[2] == pytest.approx(1 / 3, abs=0.1)
    planted = _planted_expert(run_dir)
    planted_rows = set(steps.row_keys(steps.expert_records(str(run_dir), planted)))

    after_run = sdk.load(str(run_dir)).remove_expert(planted)
    after = _shares(after_run)
    assert after[2] < 0.03 and after[:2] == pytest.approx([0.5, 0.5], abs=0.12)
    # Its data, its weights and the routers that saw it are gone; the deletion is recorded.
    assert not (run_dir / "data" / f"expert={planted}").exists()
    assert not (run_dir / "experts" / f"expert-{planted}").exists()
    assert not (run_dir / "router").exists()
    assert not planted_rows & set(steps.row_keys(steps.read_records(str(run_dir))))
    removed = json.loads((run_dir / "partition.json").read_text())["removed"]
    assert [(r["expert"], r["records"], r["records_dropped"]) for r in removed] == [(planted, 64, 64)]
    # The version that held it is withdrawn, naming why; the new one is current.
    with pytest.raises(versions.WithdrawnVersion, match=f"expert {planted} and its partition were removed"):
        sdk.load(str(run_dir), version=1).sample(2)
    status = run_status(str(run_dir))
    assert [(v["version"], v["expert_ids"], bool(v["withdrawn"])) for v in status["versions"]] == [
        (1, [0, 1, 2], True), (2, [k for k in range(3) if k != planted], False)]


def test_add_data_as_a_new_partition_covers_it_and_leaves_the_others_untouched(tmp_path):
    run_dir = tmp_path / "two"
    run = _fit(run_dir, [0, 1])
    experts_before = _files(run_dir / "experts")
    assert _shares(run)[2] < 0.03

    grown = run.add_data(_blobs([2], seed=1), new_partitions=1)
    assert _shares(grown)[2] == pytest.approx(1 / 3, abs=0.1)
    assert {k: v for k, v in _files(run_dir / "experts").items() if not k.startswith("expert-2/")} == experts_before
    saved = versions.load(str(run_dir))
    assert (saved["version"], saved["expert_ids"], saved["change"]) == (2, [0, 1, 2],
                                                                        "added experts [2]; router retrained")
    assert sdk.load(str(run_dir), version=1).sample(4).batch["x"].shape == (4, 2)  # the old version stays usable


def test_add_data_into_the_clusters_trains_on_only_the_experts_that_grew(three, tmp_path):
    run_dir = tmp_path / "run"
    _copy(three, run_dir)
    planted = _planted_expert(run_dir)
    others = {k: _files(run_dir / "experts" / f"expert-{k}") for k in range(3) if k != planted}
    sdk.load(str(run_dir)).add_data(_blobs([2], n=32, seed=2))
    summary = json.loads((run_dir / "partition.json").read_text())
    assert summary["sizes"][planted] == 96 and summary["expert_steps"] == {str(planted): 300 + 150}
    assert steps.read_records(str(run_dir)).num_rows == 192 + 32
    assert {k: _files(run_dir / "experts" / f"expert-{k}") for k in others} == others
    assert versions.load(str(run_dir))["change"] == f"experts [{planted}] trained on; router retrained"


def test_samples_are_attributed_to_the_experts_that_made_them(three, capsys, tmp_path):
    run = sdk.load(str(three))
    out = run.sample(300, strategy="full", steps=30)
    frame = run.attribute(out, nearest=2)
    summary = json.loads((three / "partition.json").read_text())
    near = Partition(np.zeros(0, int), np.asarray(summary["centroids"]), np.asarray(summary["mean"]),
                     np.asarray(summary["scale"])).assign(out.batch["x"].numpy())
    confusion = np.zeros((3, 3), int)
    np.add.at(confusion, (near, frame["expert"].to_numpy()), 1)
    assert np.trace(confusion) / confusion.sum() > 0.9, confusion
    assert np.allclose(frame[["w_0", "w_1", "w_2"]].sum(axis=1), 1.0, atol=1e-5)
    rows = steps.expert_records(str(three), int(frame["expert"][0]))
    assert len(frame["nearest_rows"][0]) == 2 and max(frame["nearest_rows"][0]) < rows.num_rows
    # From the command line: the attribution file beside the samples.
    assert main(["sample", "--run-dir", str(three), "-n", "8", "--strategy", "full", "--out",
                 str(tmp_path / "s.npy")]) == 0
    written = (tmp_path / "s.attribution.csv").read_text().splitlines()
    assert written[0].startswith("sample,expert,weight,w_0,w_1,w_2,nearest_rows") and len(written) == 9


def test_integrated_weights_follow_the_analytic_posterior_along_the_trajectory():
    x_1 = torch.randn(512, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ensemble = analytic_ensemble("full")
    out = integrate(ensemble, {"x": x_1}, FIELDS, "euler", 200)
    # The same trajectory from the marginal velocity, with the analytic posterior recorded on the way.
    grid, x, posteriors = torch.linspace(1.0, 0.0, 201, dtype=torch.float64), x_1, []
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        t_b = t.expand(len(x))
        posteriors.append(analytic_posterior(x, t_b))
        velocity = x - PI @ MU if t == 1 else marginal_velocity(x, t_b)  # at t = 1, x = eps: E[x_0] = sum pi mu
        x = x + (t_next - t) * velocity
    assert torch.allclose(out["x"], x, atol=1e-6)
    assert torch.allclose(ensemble.attribution(), torch.stack(posteriors).mean(0), atol=1e-6)
    # Each sample's main expert is the component it landed in.
    landed = ((x[:, None, :] - MU[None]) ** 2).sum(-1).argmin(1)
    assert (ensemble.attribution().argmax(1) == landed).double().mean() > 0.95


def test_bad_module_changes_are_refused_and_the_version_stays_usable(three, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _copy(three, run_dir)
    before = _files(run_dir)
    with pytest.raises(ValueError, match=r"expert 7 does not exist: the run's experts are \[0, 1, 2\]"):
        modules.remove_expert(str(run_dir), 7)
    with pytest.raises(ValueError, match="new_partitions=100 is more than the 64 new records"):
        modules.add_data(str(run_dir), _blobs([2]), new_partitions=100)
    with pytest.raises(ValueError, match=r"features of shape \(3,\), the run's partition has 2"):
        modules.add_data(str(run_dir), np.zeros((5, 3), np.float32))  # vectors of another length
    assert main(["remove-expert", "--run-dir", str(run_dir), "--expert", "7", "--in-process", "--no-tracking"]) == 1
    assert "expert 7 does not exist" in capsys.readouterr().err
    assert _files(run_dir) == before
    sdk.load(str(run_dir)).sample(4)


def test_each_change_is_a_new_registered_version_of_the_mlflow_model(tmp_path):
    import mlflow

    from archipelago.platform import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _fit(tmp_path / "two", [0, 1])
    tracked = {"track": True, "tracking_uri": uri, "register": "planted"}
    run.add_data(_blobs([2], seed=1), new_partitions=1, **tracked).remove_expert(0, **tracked)
    client = mlflow.MlflowClient(uri)
    assert sorted(int(v.version) for v in client.search_model_versions("name='planted'")) == [1, 2]
    experiments = [e.experiment_id for e in client.search_experiments()]
    routers = client.search_runs(experiments, "attributes.run_name = 'router'")
    assert routers and all({"router_calibration.json", "router_calibration.png"}
                           <= {a.path for a in client.list_artifacts(r.info.run_id)} for r in routers)
    with tracking._tracking_uri(uri):  # MLflow's process-wide URI, restored after
        for version, experts in [(1, 3), (2, 2)]:
            model = mlflow.pyfunc.load_model(f"models:/planted/{version}")
            saved = json.loads(Path(model.unwrap_python_model().run.run_dir, "ensemble.json").read_text())
            assert len(saved["expert_ids"]) == experts
            assert np.asarray(model.predict({"n": 4, "strategy": "full"})).shape[0] == 4


def test_removing_the_last_expert_is_refused(tmp_path):
    run = sdk.fit(_blobs([0]), str(tmp_path / "one"), domain=VectorDomain(), experts=1, expert={**TRAIN, "steps": 4},
                  router={**TRAIN, "steps": 4})
    with pytest.raises(ValueError, match="expert 0 is the run's last expert"):
        run.remove_expert(0)


def test_a_run_whose_experts_are_still_training_is_refused(three, tmp_path):
    run_dir = tmp_path / "run"
    _copy(three, run_dir)
    config = json.loads((run_dir / "run.json").read_text())
    config["config"]["expert"]["steps"] = 400  # as if the fit were still going
    (run_dir / "run.json").write_text(json.dumps(config))
    before = _files(run_dir)
    with pytest.raises(modules.RunBusy, match=r"expert 0 is still training \(step 300 of 400\)"):
        modules.add_data(str(run_dir), _blobs([2]))
    assert _files(run_dir) == before


def _copy(source: Path, target: Path) -> None:
    import shutil

    shutil.copytree(source, target)
    for meta in target.rglob("meta.json"):  # nothing in a run names its absolute path, but be sure
        assert str(source) not in meta.read_text()


def test_router_diagnostics_and_coverage_of_a_run(three):
    run = sdk.load(str(three))
    table = run.router_diagnostics(records=192)
    assert list(table["t"])[:2] == [0.05, 0.1] and table["accuracy"].iloc[0] > 0.95
    assert table["accuracy"].iloc[0] > table["accuracy"].iloc[-1]
    covered = run.coverage(run.sample(300, strategy="full", steps=30))
    assert covered["experts"] == [0, 1, 2] and covered["total_variation"] < 0.1


def test_the_likelihood_router_of_a_run_is_scored_and_sampled_like_the_trained_one(three):
    run = sdk.load(str(three))
    table = run.router_diagnostics(records=96, likelihood_draws=4)
    assert table["accuracy"].iloc[0] > 0.9  # well separated blobs: known from x_t at small t
    for strategy in ("full", "stochastic"):
        out = run.sample(200, strategy=strategy, router="likelihood", likelihood_draws=4, steps=10)
        assert _shares_of(out.batch["x"].numpy()) == pytest.approx([1 / 3] * 3, abs=0.1), strategy


def _shares_of(x: np.ndarray) -> np.ndarray:
    return np.bincount(((x[:, None, :] - CENTERS[None]) ** 2).sum(-1).argmin(1), minlength=3) / len(x)
