"""Routing strategies and diagnostics on the Gaussian mixture with analytic experts and router:
`switch` at its ends is top-1 and the full mixture exactly, `stochastic` over many steps draws the
full mixture's distribution, `router_every` reuses the router's answer, and the diagnostics
(accuracy and ECE along t, coverage) have their known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.stats import ks_2samp

from archipelago.experts.solvers import integrate
from archipelago.router.diagnostics import coverage, router_calibration
from archipelago.router.ensemble import Ensemble
from archipelago.router.partition import Partition
from archipelago.router.sampling import SampleRequest
from archipelago.router.training import Router
from tests.test_ensemble import (
    FIELDS,
    MU,
    PI,
    AnalyticExpert,
    AnalyticRouterNet,
    S,
    analytic_ensemble,
    analytic_posterior,
)


def _x1(n: int = 2000, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)}


def _sample(strategy: str, steps: int = 50, seed: int = 0, **options) -> tuple[torch.Tensor, Ensemble]:
    ensemble = analytic_ensemble(strategy, generator=torch.Generator().manual_seed(seed + 7), **options)
    return integrate(ensemble, _x1(seed=seed), FIELDS, "euler", steps)["x"], ensemble  # no call at t = 0


@pytest.mark.parametrize(("switch", "same_as"), [(0.0, "top1"), (1.0, "full")])
def test_switch_at_its_ends_is_top1_and_the_full_mixture_exactly(switch, same_as):
    assert torch.equal(_sample("switch", switch=switch)[0], _sample(same_as)[0])


def test_switch_in_between_mixes_early_and_chooses_late():
    x, ensemble = _sample("switch", steps=10, switch=0.5)
    assert not torch.equal(x, _sample("top1", steps=10)[0]) and not torch.equal(x, _sample("full", steps=10)[0])
    full_calls = _sample("full", steps=10)[1].evaluations.expert
    top1_calls = _sample("top1", steps=10)[1].evaluations.expert
    assert top1_calls < ensemble.evaluations.expert < full_calls


def test_stochastic_routing_over_many_steps_draws_the_full_mixtures_distribution():
    full, _ = _sample("full", steps=200, seed=1)
    stochastic, ensemble = _sample("stochastic", steps=200, seed=2)
    for d in range(2):  # two-sample Kolmogorov-Smirnov per coordinate, independent draws of x_1
        assert ks_2samp(full[:, d].numpy(), stochastic[:, d].numpy()).pvalue > 0.01
    assert ensemble.evaluations.expert == 2000 * 200  # one expert per sample and call, as top-1
    # The component shares of its samples are the mixture weights.
    shares = np.bincount(((stochastic[:, None, :] - MU[None]) ** 2).sum(-1).argmin(1).numpy(), minlength=3) / 2000
    assert shares == pytest.approx(PI.numpy(), abs=0.04)


def test_router_every_m_calls_reuses_the_routers_answer():
    every, reused = _sample("top1", steps=20)[1], _sample("top1", steps=20, router_every=4)[1]
    assert reused.evaluations.router * 4 == every.evaluations.router
    assert torch.equal(_sample("top1", steps=20, router_every=1)[0], _sample("top1", steps=20)[0])
    trace = reused.trace()
    assert trace.shape == (2000, 20) and torch.equal(trace[:, 0], trace[:, 3])


@pytest.mark.parametrize(("field", "value", "names"), [
    ("switch", 1.5, "switch"), ("switch", -0.1, "switch"), ("router_every", 0, "router_every")])
def test_bad_routing_options_are_refused_naming_them(field, value, names):
    with pytest.raises(ValidationError, match=names):
        SampleRequest(strategy="switch", **{field: value})
    with pytest.raises(ValueError, match=names):
        Ensemble([AnalyticExpert(k) for k in range(3)], Router(AnalyticRouterNet(), FIELDS), FIELDS, "switch",
                 **{field: value})


def test_calibration_of_the_analytic_router_is_perfect_and_accuracy_falls_with_t():
    generator = torch.Generator().manual_seed(3)
    labels = torch.multinomial(PI, 20000, replacement=True, generator=generator)
    x0 = MU[labels] + S[labels, None] * torch.randn(20000, 2, generator=generator, dtype=torch.float64)
    rows = router_calibration(Router(AnalyticRouterNet(), FIELDS), FIELDS, {"x": x0}, labels)
    assert [row["t"] for row in rows][0] == 0.05 and rows[-1]["t"] == 1.0
    assert all(row["ece"] < 0.02 for row in rows)  # the exact posterior is calibrated
    assert rows[0]["accuracy"] > 0.99 and rows[-1]["accuracy"] == pytest.approx(0.5, abs=0.02)  # at t=1: the prior
    accuracies = [row["accuracy"] for row in rows]
    assert all(a >= b - 0.01 for a, b in zip(accuracies, accuracies[1:], strict=False))


def test_coverage_is_zero_for_the_data_and_one_when_one_cluster_is_missed():
    partition = Partition(np.zeros(0, int), MU.numpy(), np.zeros(2), np.ones(2))
    points = np.repeat(MU.numpy(), [50, 30, 20], axis=0)
    assert coverage(points, partition, [50, 30, 20])["total_variation"] == pytest.approx(0.0)
    missed = coverage(np.repeat(MU.numpy()[:1], 10, axis=0), partition, [50, 50, 0])
    assert missed["shares"] == [1.0, 0.0, 0.0] and missed["total_variation"] == pytest.approx(0.5)


def test_two_stage_partition_is_balanced_and_keeps_separated_clusters_whole():
    from archipelago.router.partition import kmeans_partition

    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(size=(n, 2)) + center for n, center in
                            [(300, (-8, 0)), (300, (8, 0)), (300, (0, 8)), (300, (0, -8))]])
    for method in ("kmeans", "two_stage"):
        partition = kmeans_partition(blobs, 4, seed=0, method=method, fine_clusters=40)
        assert max(partition.sizes) <= 315 and min(partition.sizes) >= 285, (method, partition.sizes)
        truth = np.repeat(np.arange(4), 300)
        purity = sum(np.bincount(partition.labels[truth == c]).max() for c in range(4)) / len(truth)
        assert purity > 0.95, method
    skewed = np.concatenate([rng.normal(size=(600, 2)), rng.normal(size=(200, 2)) + (12, 0)])
    sizes = kmeans_partition(skewed, 2, seed=0, method="two_stage", fine_clusters=50).sizes
    assert max(sizes) <= 420 + 30  # balanced up to about one fine cluster over the cap of 420
    with pytest.raises(ValueError, match="unknown partition method 'spectral'"):
        kmeans_partition(blobs, 4, method="spectral")


def _noised_mixture(n: int, t: float, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(PI, n, replacement=True, generator=generator)
    x0 = MU[labels] + S[labels, None] * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (1 - t) * x0 + t * eps, torch.full((n,), t, dtype=torch.float64)


@pytest.mark.parametrize("t", [0.3, 0.7])
def test_the_likelihood_routers_posterior_approaches_the_analytic_one_as_its_draws_grow(t):
    from archipelago.router.likelihood import LikelihoodRouter

    x_t, times = _noised_mixture(400, t)
    exact = analytic_posterior(x_t, times)
    errors = []
    for draws in (4, 64, 1024):
        router = LikelihoodRouter([AnalyticExpert(k) for k in range(3)], FIELDS, (PI * 1000).tolist(), draws,
                                  torch.Generator().manual_seed(5))
        errors.append(float((router.posterior({"x": x_t}, times) - exact).abs().sum(1).mean()))
        assert router.expert_calls == 400 * 3 * 2 * draws
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors


def test_likelihood_routing_samples_the_mixture_through_the_request(tmp_path):
    from archipelago.router.sampling import sample_ensemble
    from tests.toy_domains import VectorDomain

    request = SampleRequest(n=64, strategy="top1", router="likelihood", likelihood_draws=2, steps=5, solver="euler")
    experts = [AnalyticExpert(k) for k in range(3)]
    out = sample_ensemble(VectorDomain(), experts, None, request, (PI * 100).tolist())
    assert out.batch["x"].shape == (64, 2)
    assert out.expert_calls_per_sample == 5 * (1 + 3 * 2 * 2)  # top-1's call plus the likelihoods'


def test_bad_likelihood_routing_is_refused_naming_the_problem():
    from archipelago.experts.batch import FieldSpec
    from archipelago.experts.paths import MaskedPath
    from archipelago.router.likelihood import LikelihoodRouter

    with pytest.raises(ValueError, match="draws >= 1"):
        LikelihoodRouter([AnalyticExpert(0)], FIELDS, [1], draws=0)
    with pytest.raises(ValueError, match="field 'types' is MaskedPath"):
        LikelihoodRouter([AnalyticExpert(0)], {"types": FieldSpec(MaskedPath(3))}, [1])
    raw = AnalyticExpert(0)
    raw.prediction = "x0"
    with pytest.raises(ValueError, match="expert 1 predicts x0 and is not a Denoiser"):
        LikelihoodRouter([AnalyticExpert(0), raw], FIELDS, [1, 1])
    with pytest.raises(ValidationError, match="likelihood_draws"):
        SampleRequest(router="likelihood", likelihood_draws=0)


def test_every_router_batch_holds_every_cluster(tmp_path, monkeypatch):
    """With one shard per partition, batches drawn shard by shard held one cluster each, and on
    Stocks the router came out the same for every input; now each batch mixes the partitions."""
    from archipelago.experts.data import batch_ids
    from archipelago.platform import sdk, steps
    from tests.toy_domains import VectorDomain

    seen = {}

    def capture(config, domain, samples, labels, *args, **kwargs):
        seen.update(samples=samples, labels=labels)
        raise RuntimeError("captured")

    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(scale=0.5, size=(64, 2)) + c for c in [(-4, 0), (4, 0), (0, 6)]])
    tiny = {"steps": 2, "batch_size": 32, "warmup_steps": 1, "progress": False}
    run = sdk.fit(data.astype(np.float32), str(tmp_path / "run"), domain=VectorDomain(), experts=3, expert=tiny,
                  router=tiny, stream=True)
    monkeypatch.setattr(steps, "train_router", capture)
    with pytest.raises(RuntimeError, match="captured"):
        steps.train_router_step(run.run_dir)
    samples, labels = seen["samples"], seen["labels"]
    generator = torch.Generator().manual_seed(0)
    for step in range(20):
        ids = batch_ids(samples.block_sizes(), step, 32, generator, 0)
        assert len(labels[ids].unique()) == 3, step
    records = np.concatenate([steps.expert_records(run.run_dir, k)["x"].to_pylist() for k in range(3)])
    assert np.array_equal(samples.batch(torch.arange(len(labels)))["x"].numpy(), records.astype(np.float32))
    assert labels.tolist() == [k for k in range(3) for _ in range(len(steps.expert_records(run.run_dir, k)))]
