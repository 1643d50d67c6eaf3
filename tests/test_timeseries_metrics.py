"""Tests of the time-series generation metrics (domains/timeseries/metrics.py, ts2vec.py) on CPU.

Real windows are sines whose channels share a random frequency and phase (so channels correlate and
the last channel is predictable from the others); "same" is a fresh draw of that distribution and
"noise" is i.i.d. uniform noise around 0.5. Iteration counts are cut to keep the file fast.
"""

import math

import numpy as np
import pytest
import torch

from archipelago.domains.timeseries.metrics import (
    METRICS,
    RBF_BANDWIDTHS,
    Score,
    evaluate,
    fdds,
    frechet_distance,
    mmd,
    predictive,
)
from archipelago.domains.timeseries.ts2vec import (
    DilatedBlock,
    embed,
    hierarchical_contrastive_loss,
    seeded,
    train_ts2vec,
)

N, L, C = 128, 24, 4

# Small settings per metric: enough training to separate sines from noise, little else.
FAST = {
    "context_fid": {"iterations": 5},
    "correlational": {},
    "discriminative": {"iterations": 100, "batch_size": 32},
    "predictive": {"iterations": 300, "batch_size": 32},
    "vds": {"positions": 500},
    "fdds": {},
    "roughness": {},
}
DISTANCES = [name for name in METRICS if name != "roughness"]  # roughness is a ratio, 1 at best


def sines(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(L)[None, :, None]
    freq, phase = rng.uniform(0.05, 0.15, (n, 1, 1)), rng.uniform(0, 2 * np.pi, (n, 1, 1))
    return (np.sin(2 * np.pi * freq * t + phase + 0.6 * np.arange(C)) + 1) / 2  # [n, L, C] in [0, 1]


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    noise = np.random.default_rng(2).uniform(0.4, 0.6, (N, L, C))
    return {"real": sines(N, seed=0), "same": sines(N, seed=1), "noise": noise}


def test_identical_sets_score_zero(data):
    real = data["real"]
    assert fdds(real, real, repeats=1).mean == pytest.approx(0.0, abs=1e-9)
    assert METRICS["vds"](real, real, repeats=2, positions=500).mean == pytest.approx(0.0, abs=1e-9)
    # Correlational compares two independent bootstrap batches, so it is small but not exactly 0.
    assert METRICS["correlational"](real, real, repeats=3).mean < 0.03
    assert abs(METRICS["context_fid"](real, real, repeats=1, iterations=5).mean) < 1e-3


@pytest.mark.parametrize("name", DISTANCES)
def test_different_distributions_score_higher(data, name):
    metric = METRICS[name]
    close = metric(data["real"], data["same"], repeats=1, **FAST[name]).mean
    far = metric(data["real"], data["noise"], repeats=1, **FAST[name]).mean
    assert far > close + 0.05, (close, far)


@pytest.mark.parametrize("name", list(METRICS))
def test_same_seed_same_score(data, name):
    settings = {**FAST[name], **({"iterations": 3} if "iterations" in FAST[name] else {})}
    first = METRICS[name](data["real"], data["same"], repeats=2, seed=7, **settings)
    second = METRICS[name](data["real"], data["same"], repeats=2, seed=7, **settings)
    assert first == second
    assert len(first.values) == 2 and first.mean == pytest.approx(np.mean(first.values))


def test_roughness_is_one_for_the_data_and_grows_with_residual_noise(data):
    real = data["real"]
    assert METRICS["roughness"](real, real, repeats=3).values == (1.0, 1.0, 1.0)
    noisy = real + np.random.default_rng(0).normal(scale=0.2, size=real.shape)
    assert METRICS["roughness"](real, noisy, repeats=1).mean > 1.3
    assert METRICS["roughness"](real, real[:, ::-1], repeats=1).mean == pytest.approx(1.0)


def test_interval(data):
    single = METRICS["correlational"](data["real"], data["same"], repeats=1)
    assert single.interval == 0.0 and len(single.values) == 1
    for name in ("correlational", "vds"):
        assert METRICS[name](data["real"], data["same"], repeats=3, **FAST[name]).interval > 0
    # Student t with 2 degrees of freedom: half-width t_{0.975, 2} * s / sqrt(3) with s = 1.
    assert Score.of([1.0, 2.0, 3.0]).interval == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)


@pytest.mark.parametrize(
    ("real", "fake", "named"),
    [
        (np.zeros((8, 24)), np.zeros((8, 24, 2)), "real"),
        (np.zeros((8, 24, 2)), np.zeros((8, 24, 3)), "fake"),
        (np.zeros((8, 24, 2)), np.zeros((8, 12, 2)), "fake"),
        (np.full((8, 24, 2), np.nan), np.zeros((8, 24, 2)), "real"),
        (np.zeros((8, 24, 2)), np.insert(np.zeros((7, 24, 2)), 3, np.nan, axis=0), "fake"),
    ],
)
@pytest.mark.parametrize("name", list(METRICS))
def test_invalid_shapes_raise(real, fake, named, name):
    with pytest.raises(ValueError, match=named):
        METRICS[name](real, fake, repeats=1)


def test_mmd_matches_analytic_value():
    # One point each at distance 1: k(0, 0) = 9 (nine kernels), k(0, 1) = sum_s exp(-1 / (2 s)).
    cross = sum(math.exp(-1 / (2 * s)) for s in RBF_BANDWIDTHS)
    assert mmd(np.array([0.0]), np.array([1.0])) == pytest.approx(18 - 2 * cross, rel=1e-6)
    # x = {0, 0.5}, y = {0.5}: mean k_xx = (9 + k(0.5)) / 2, k_yy = 9, mean k_xy = (k(0.5) + 9) / 2.
    half = sum(math.exp(-0.25 / (2 * s)) for s in RBF_BANDWIDTHS)
    value = (9 + half) / 2 + 9 - (half + 9)
    assert mmd(np.array([[0.0], [0.5]]), np.array([[0.5]])) == pytest.approx(value, rel=1e-6)
    assert mmd(np.array([0.2, 0.7]), np.array([0.2, 0.7])) == 0.0


def test_frechet_distance_of_a_shift_is_its_squared_length():
    a = np.random.default_rng(0).normal(size=(500, 3))
    assert frechet_distance(a, a + np.array([1.0, 2.0, 2.0])) == pytest.approx(9.0, abs=1e-6)


def test_one_channel_is_rejected_where_undefined(data):
    one = data["real"][..., :1]
    with pytest.raises(ValueError, match="2 channels"):
        predictive(one, one, repeats=1, iterations=1)
    with pytest.raises(ValueError, match="2 channels"):
        fdds(one, one, repeats=1)


def test_evaluate_routes_overrides(data):
    scores = evaluate(data["real"], data["same"], ["correlational", "vds"], repeats=2, vds={"positions": 200})
    assert set(scores) == {"correlational", "vds"} and all(isinstance(s, Score) for s in scores.values())
    with pytest.raises(ValueError, match="valid names"):
        evaluate(data["real"], data["same"], ["fid"])
    with pytest.raises(ValueError, match="iterations"):
        evaluate(data["real"], data["same"], ["correlational"], iterations=10)


def test_ts2vec_embeddings_and_loss():
    windows = torch.as_tensor(sines(16, seed=3), dtype=torch.float32)
    encoder = train_ts2vec(windows, torch.Generator().manual_seed(0), iterations=2)
    assert embed(encoder, windows).shape == (16, 320)


def test_contrastive_loss_closed_forms():
    """InfoNCE per pyramid level, averaged over levels (T = 6, 3, then 1 after max-pooling)."""
    batch, steps = 4, 6
    # All-zero embeddings: every similarity is 0, so each item's positive has probability 1 / (2n - 1)
    # among its 2n - 1 candidates: n = 4 windows (instance) and n = T time steps (temporal), the last
    # level (T = 1) instance only, with weight alpha = 0.5 each.
    zero = torch.zeros(batch, steps, 8)
    per_level = [0.5 * math.log(7) + 0.5 * math.log(11), 0.5 * math.log(7) + 0.5 * math.log(5), 0.5 * math.log(7)]
    assert hierarchical_contrastive_loss(zero, zero).item() == pytest.approx(np.mean(per_level), rel=1e-6)
    # Identical views with orthogonal, large embeddings per (window, step): each positive wins outright.
    separated = 5 * torch.eye(batch * steps).reshape(batch, steps, batch * steps)
    assert hierarchical_contrastive_loss(separated, separated).item() < 1e-6
    # Views whose windows are swapped: each positive is orthogonal while a negative matches, worse than chance.
    swapped = hierarchical_contrastive_loss(separated, separated.roll(1, dims=0)).item()
    assert swapped > np.mean(per_level) + 10


def test_wide_dilation_applies_only_the_centre_tap():
    block = seeded(lambda: DilatedBlock(8, 8, dilation=32, project=False), torch.Generator(), "cpu")
    h = torch.randn(2, 8, 24, generator=torch.Generator().manual_seed(1))
    full = block.conv2(torch.nn.functional.gelu(block.conv1(torch.nn.functional.gelu(h)))) + h
    torch.testing.assert_close(block(h), full)


@pytest.mark.parametrize("progress", [True, False])
def test_evaluate_draws_one_bar_step_per_metric_and_repeat_on_stderr(data, capsys, progress):
    """fdds on equal-sized sets is computed once yet still counts both its repeats."""
    fast = {name: FAST[name] for name in ("correlational", "vds", "fdds")}
    evaluate(data["real"], data["same"], list(fast), repeats=2, progress=progress, **fast)
    captured = capsys.readouterr()
    assert captured.out == ""
    if progress:
        assert "evaluate" in captured.err and "6/6" in captured.err, captured.err
    else:
        assert captured.err == ""


def test_the_bar_is_on_by_default_in_the_domain_and_the_command_line(data, capsys):
    from archipelago.domains.timeseries.domain import TimeSeriesDomain
    from archipelago.platform.cli import build_parser

    TimeSeriesDomain.evaluate_windows(data["real"], data["same"], metrics=["correlational"], repeats=2)
    assert "2/2" in capsys.readouterr().err
    evaluate_args = ["evaluate", "--run-dir", "run", "--samples", "s.npy"]
    assert build_parser().parse_args(evaluate_args).progress is True
    assert build_parser().parse_args([*evaluate_args, "--no-progress"]).progress is False
