"""Standard scores for generated time-series windows, reported as mean +- 95% interval over repeats.

Context-FID (PSA-GAN, Jeha et al., ICLR 2022), the correlational score, and TimeGAN's discriminative
and predictive scores (Yoon et al., NeurIPS 2019), all as computed by Diffusion-TS (Yuan & Qiao,
ICLR 2024); VDS and FDDS as defined by PaD-TS (Li et al., AAAI 2025). Inputs are numpy arrays
[N, L, C] of windows min-max scaled to [0, 1]; lower is better for every score. Each repeat draws all
its randomness from its own seed, derived from `seed`; no global random state is read or set.
Each metric calls `on_repeat(n)` as repeats finish (a progress bar's `update`); `evaluate` can draw
one tqdm bar on stderr over every (metric, repeat) of its run.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from archipelago.domains.timeseries.ts2vec import embed, seeded, train_ts2vec

RBF_BANDWIDTHS = (0.01, 0.05, 0.1, 0.2, 0.5, 0.7, 1.0, 1.5, 2.0)  # PaD-TS's kernel variances
OnRepeat = Callable[[int], object]  # called with the number of repeats just finished


@dataclass(frozen=True)
class Score:
    """A score over repeats."""

    mean: float
    interval: float  # half-width of the 95% Student-t confidence interval; 0.0 for one repeat
    values: tuple[float, ...]  # one per repeat

    @classmethod
    def of(cls, values: Sequence[float]) -> Score:
        values = tuple(float(v) for v in values)
        n = len(values)
        interval = 0.0 if n == 1 else float(scipy.stats.sem(values) * scipy.stats.t.ppf(0.975, n - 1))
        return cls(float(np.mean(values)), interval, values)


def _check(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate two sets of windows [N, L, C] with the same L and C (N may differ)."""
    checked = []
    for name, x in (("real", real), ("fake", fake)):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 3:
            raise ValueError(f"{name} must be a 3-D array [N, L, C], got shape {x.shape}")
        if x.shape[0] < 2 or x.shape[1] < 2 or x.shape[2] < 1:
            raise ValueError(f"{name} needs at least 2 windows of at least 2 steps, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        checked.append(x)
    real, fake = checked
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"fake has windows of shape {fake.shape[1:]}, real of shape {real.shape[1:]}")
    return real, fake


def _repeat(
    once: Callable[[int], float],
    repeats: int,
    seed: int,
    deterministic: bool = False,
    on_repeat: OnRepeat | None = None,
) -> Score:
    """Score.of(once(s) for each repeat's seed s); a deterministic score is computed once (and
    reported to `on_repeat` as all its repeats at once)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(repeats)]
    report = on_repeat or (lambda n: None)
    if deterministic:
        value = once(seeds[0])
        report(repeats)
        return Score.of([value] * repeats)
    values = []
    for s in seeds:
        values.append(once(s))
        report(1)
    return Score.of(values)


def _equal_counts(real: np.ndarray, fake: np.ndarray, rng: np.random.Generator):
    """Subsample the larger set, without replacement, to the size of the smaller."""
    n = min(len(real), len(fake))
    return tuple(x if len(x) == n else x[np.sort(rng.choice(len(x), n, replace=False))] for x in (real, fake))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of the rows of a and b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real  # drop imaginary round-off, as the FID code does
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def context_fid(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    iterations: int = 600,
    batch_size: int = 8,
    repeats: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_repeat: OnRepeat | None = None,
) -> Score:
    """Frechet distance between TS2Vec embeddings of equally many (seeded subsample of the larger set)
    real and generated windows; the encoder is trained afresh on all real windows in every repeat."""
    real, fake = _check(real, fake)
    real_t, fake_t = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (real, fake))

    def once(s: int) -> float:
        encoder = train_ts2vec(real_t, torch.Generator().manual_seed(s), iterations=iterations, batch_size=batch_size)
        codes = (embed(encoder, x).cpu().numpy() for x in (real_t, fake_t))  # [N, 320] each
        return frechet_distance(*_equal_counts(*codes, np.random.default_rng(s)))

    return _repeat(once, repeats, seed, on_repeat=on_repeat)


def _cross_correlation(x: np.ndarray) -> np.ndarray:
    """Lag-0 correlations between channels of x [B, L, C], pooled over windows and steps: [C(C-1)/2]."""
    flat = x.reshape(-1, x.shape[-1])  # [B * L, C]
    std = flat.std(axis=0, ddof=1)
    z = (flat - flat.mean(axis=0)) / np.where(std > 0, std, 1.0)  # a constant channel correlates 0
    corr = z.T @ z / len(z)  # [C, C]; mean of products of standardized values, as Diffusion-TS
    return corr[np.tril_indices(x.shape[-1], k=-1)]


def correlational(
    real: np.ndarray, fake: np.ndarray, *, repeats: int = 5, seed: int = 0, on_repeat: OnRepeat | None = None
) -> Score:
    """Sum over channel pairs of |corr_real - corr_fake| / 10 (0 for one channel). As Diffusion-TS,
    each repeat compares N_real // repeats windows drawn with replacement from each set, each batch
    standardized with its own per-channel mean and std."""
    real, fake = _check(real, fake)
    size = max(2, len(real) // repeats)

    def once(s: int) -> float:
        rng = np.random.default_rng(s)
        r, f = (x[rng.integers(len(x), size=size)] for x in (real, fake))
        return float(np.abs(_cross_correlation(r) - _cross_correlation(f)).sum() / 10)

    return _repeat(once, repeats, seed, on_repeat=on_repeat)


class PostHocGRU(nn.Module):
    """TimeGAN's post-hoc network: a one-layer GRU with a linear read-out at every step."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.gru = nn.GRU(channels, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, L, channels]
        return self.readout(self.gru(x)[0]).squeeze(-1)  # [B, L]


def _batch(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` distinct windows of x, drawn at random (TimeGAN's mini-batches)."""
    return x[torch.randperm(len(x), generator=generator)[:size].to(x.device)]


def _split(x: torch.Tensor, generator: torch.Generator, train: float = 0.8):
    """A random train/test split of the windows of x."""
    order = torch.randperm(len(x), generator=generator).to(x.device)
    cut = int(len(x) * train)
    return x[order[:cut]], x[order[cut:]]


def _train(net: nn.Module, loss: Callable[[], torch.Tensor], iterations: int) -> nn.Module:
    """Adam with TensorFlow's defaults (lr 1e-3), as TimeGAN's post-hoc networks are trained."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(iterations):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    return net


def discriminative(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    iterations: int = 2000,
    batch_size: int = 128,
    repeats: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_repeat: OnRepeat | None = None,
) -> Score:
    """|accuracy - 0.5| of a GRU (hidden max(1, C // 2)) classifying real vs generated windows. Each
    set is split 80/20; every iteration takes a batch of each training part (summed cross-entropies of
    the last step's logit); accuracy is over both test parts together."""
    real, fake = _check(real, fake)
    real_t, fake_t = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (real, fake))
    channels = real.shape[-1]

    def once(s: int) -> float:
        g = torch.Generator().manual_seed(s)
        (real_train, real_test), (fake_train, fake_test) = _split(real_t, g), _split(fake_t, g)
        net = seeded(lambda: PostHocGRU(channels, max(1, channels // 2)), g, device)

        def loss() -> torch.Tensor:
            on_real = net(_batch(real_train, batch_size, g))[:, -1]  # [b] logits of "real"
            on_fake = net(_batch(fake_train, batch_size, g))[:, -1]  # [b]
            bce = F.binary_cross_entropy_with_logits
            return bce(on_real, torch.ones_like(on_real)) + bce(on_fake, torch.zeros_like(on_fake))

        _train(net, loss, iterations)
        with torch.no_grad():
            correct = (net(real_test)[:, -1] > 0).sum() + (net(fake_test)[:, -1] <= 0).sum()
        return abs(correct.item() / (len(real_test) + len(fake_test)) - 0.5)

    return _repeat(once, repeats, seed, on_repeat=on_repeat)


def predictive(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    iterations: int = 5000,
    batch_size: int = 128,
    repeats: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_repeat: OnRepeat | None = None,
) -> Score:
    """Train on synthetic, test on real: MAE on every real window of a GRU (hidden max(1, C // 2),
    sigmoid output, L1 loss) trained on generated windows to predict channel C-1 at step t + 1 from
    the other channels at step t."""
    real, fake = _check(real, fake)
    channels = real.shape[-1]
    if channels < 2:
        raise ValueError(f"predictive needs at least 2 channels (inputs and a target), got {channels}")
    real_t, fake_t = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (real, fake))

    def predict(net: nn.Module, x: torch.Tensor) -> torch.Tensor:  # x: [B, L, C] -> [B, L - 1]
        return torch.sigmoid(net(x[:, :-1, :-1]))

    def once(s: int) -> float:
        g = torch.Generator().manual_seed(s)
        net = seeded(lambda: PostHocGRU(channels - 1, max(1, channels // 2)), g, device)

        def loss() -> torch.Tensor:
            x = _batch(fake_t, batch_size, g)  # [b, L, C]
            return (predict(net, x) - x[:, 1:, -1]).abs().mean()

        _train(net, loss, iterations)
        with torch.no_grad():
            return (predict(net, real_t) - real_t[:, 1:, -1]).abs().mean().item()

    return _repeat(once, repeats, seed, on_repeat=on_repeat)


def _mean_kernel(a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float]) -> float:
    """Mean of k(a_i, b_j) over all pairs, in row blocks of about 2^18 pairs (cache-sized, O(1) memory)."""
    total = 0.0
    for rows in a.split(max(1, (1 << 18) // len(b))):
        d2 = torch.cdist(rows, b, compute_mode="donot_use_mm_for_euclid_dist").square_()  # [block, m]
        total += sum(torch.exp(d2 * (-0.5 / s)).sum(dtype=torch.float64).item() for s in bandwidths)
    return total / (len(a) * len(b))


def mmd(
    x: np.ndarray,
    y: np.ndarray,
    bandwidths: Sequence[float] = RBF_BANDWIDTHS,
    *,
    device: str | torch.device = "cpu",
) -> float:
    """Biased (V-statistic) MMD^2 between samples x [n, d] and y [m, d]; 1-D inputs are one feature.

    The kernel is PaD-TS's sum of RBFs, k(a, b) = sum_s exp(-|a - b|^2 / (2 s)): each bandwidth s
    enters as a variance. Kernels are evaluated in float32 and summed in float64.
    """
    x, y = (torch.as_tensor(np.asarray(v, dtype=np.float32).reshape(len(v), -1), device=device) for v in (x, y))
    return _mean_kernel(x, x, bandwidths) + _mean_kernel(y, y, bandwidths) - 2 * _mean_kernel(x, y, bandwidths)


def vds(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    positions: int = 10_000,
    repeats: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_repeat: OnRepeat | None = None,
) -> Score:
    """Value distribution shift: per channel, MMD between real and generated values at `positions`
    random (window, step) positions, shared by both sets and drawn with replacement afresh per channel,
    as PaD-TS; averaged over channels. The larger set is first subsampled (seeded) to equal size."""
    real, fake = _check(real, fake)
    channels = real.shape[-1]

    def once(s: int) -> float:
        rng = np.random.default_rng(s)
        r, f = (x.reshape(-1, channels) for x in _equal_counts(real, fake, rng))  # [N * L, C]
        shifts = []
        for c in range(channels):
            at = rng.integers(len(r), size=positions)
            shifts.append(mmd(r[at, c], f[at, c], device=device))
        return float(np.mean(shifts))

    return _repeat(once, repeats, seed, on_repeat=on_repeat)


def _window_correlations(x: np.ndarray) -> np.ndarray:
    """Pearson correlation between channels within each window of x [N, L, C]: [N, C(C-1)/2].

    A channel that is constant within a window correlates 0 (PaD-TS replaces the NaN by 0).
    """
    centred = x - x.mean(axis=1, keepdims=True)
    cov = np.einsum("nlc,nld->ncd", centred, centred)  # [N, C, C]
    std = np.sqrt(np.einsum("ncc->nc", cov))  # [N, C]
    scale = std[:, :, None] * std[:, None, :]
    corr = np.divide(cov, scale, out=np.zeros_like(cov), where=scale > 0)
    return corr[(slice(None), *np.tril_indices(x.shape[-1], k=-1))]


def fdds(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    repeats: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_repeat: OnRepeat | None = None,
) -> Score:
    """Feature dependency distribution shift: per channel pair, MMD between the real and generated
    distributions of the within-window correlation coefficient, averaged over pairs. Deterministic
    (computed once) for sets of equal size; otherwise each repeat subsamples the larger set."""
    real, fake = _check(real, fake)
    if real.shape[-1] < 2:
        raise ValueError(f"fdds needs at least 2 channels, got {real.shape[-1]}")

    def once(s: int) -> float:
        r, f = (_window_correlations(x) for x in _equal_counts(real, fake, np.random.default_rng(s)))
        return float(np.mean([mmd(r[:, p], f[:, p], device=device) for p in range(r.shape[1])]))

    return _repeat(once, repeats, seed, deterministic=len(real) == len(fake), on_repeat=on_repeat)


def roughness(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    repeats: int = 5,
    seed: int = 0,
    on_repeat: OnRepeat | None = None,
) -> Score:
    """Roughness: the mean absolute step-to-step change of generated windows over that of the real
    ones (1: as smooth as the data; above 1: residual high-frequency noise, which a discriminator
    sees at once). Not a metric of ANCHORS.md: a diagnostic of ours, deterministic (computed once)."""
    real, fake = _check(real, fake)

    def once(s: int) -> float:
        return float(np.abs(np.diff(fake, axis=1)).mean() / max(np.abs(np.diff(real, axis=1)).mean(), 1e-12))

    return _repeat(once, repeats, seed, deterministic=True, on_repeat=on_repeat)


METRICS: dict[str, Callable[..., Score]] = {
    "context_fid": context_fid,
    "correlational": correlational,
    "discriminative": discriminative,
    "predictive": predictive,
    "vds": vds,
    "fdds": fdds,
    "roughness": roughness,
}


def evaluate(
    real: np.ndarray,
    fake: np.ndarray,
    metrics: Sequence[str] | None = None,
    repeats: int = 5,
    seed: int = 0,
    progress: bool = True,
    **overrides: object,
) -> dict[str, Score]:
    """Run the named metrics (default: all of METRICS) with the same repeats and seed. An override
    named after a metric is a dict of arguments for it alone (predictive={"iterations": 1000}); any
    other goes to every selected metric that takes it (device="cuda"); one that none takes is an error.
    `progress`: a tqdm bar on stderr with one step per (metric, repeat); the defaults train
    several networks per repeat and run for minutes.
    """
    names = list(METRICS) if metrics is None else list(metrics)
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; valid names are {list(METRICS)}")
    shared = {key: value for key, value in overrides.items() if key not in METRICS}
    kwargs = {}
    for name in names:
        accepted = inspect.signature(METRICS[name]).parameters
        kwargs[name] = {k: v for k, v in shared.items() if k in accepted} | dict(overrides.get(name, {}))
    unused = {key for key in overrides if key in METRICS and key not in names}
    unused |= set(shared) - {key for arguments in kwargs.values() for key in arguments}
    if unused:
        raise ValueError(f"no selected metric takes the overrides {sorted(unused)}")
    _check(real, fake)  # bad windows are an error before a bar is drawn
    return _run(real, fake, kwargs, repeats, seed, progress)


def _run(
    real: np.ndarray, fake: np.ndarray, kwargs: dict[str, dict], repeats: int, seed: int, progress: bool
) -> dict[str, Score]:
    """Each metric with its arguments, under one progress bar (the metric's name as its postfix)."""
    scores = {}
    bar = tqdm(total=len(kwargs) * repeats, desc="evaluate", unit="repeat", disable=not progress, file=sys.stderr)
    with bar:
        for name, arguments in kwargs.items():
            bar.set_postfix_str(name)
            scores[name] = METRICS[name](real, fake, repeats=repeats, seed=seed, on_repeat=bar.update, **arguments)
    return scores
