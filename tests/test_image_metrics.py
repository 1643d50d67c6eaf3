"""The image metrics: precision/recall against the definition, FID against its closed form, the feature net's
training, saving and caching, and the floor/ceiling report of `image_metrics` (MNIST t10k and synthetic data)."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from archipelago.domains.images import metrics

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "images" / "mnist"
TRAIN = 3000  # the first t10k images train the tiny feature net; the rest are unseen by it


def _idx(path: Path) -> np.ndarray:
    """An IDX file's array (big-endian dimension sizes after a 4-byte magic whose last byte is the rank)."""
    data = gzip.decompress(path.read_bytes())
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(shape)


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    images, labels = MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz"
    if not (images.exists() and labels.exists()):
        pytest.skip(f"MNIST t10k not found under {MNIST}")
    return _idx(images)[..., None], _idx(labels).astype(np.int64)


@pytest.fixture(scope="module")
def trained(mnist) -> tuple[metrics.FeatureNet, dict]:
    x, y = mnist
    return metrics.train_feature_net(x[:TRAIN], y[:TRAIN], 10, steps=300, batch_size=64, lr=4e-3)


@pytest.fixture(scope="module")
def unseen(mnist) -> tuple[np.ndarray, np.ndarray]:
    x, y = mnist
    return x[TRAIN:], y[TRAIN:]


def _brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition, spelled out: radius = distance to the k-th nearest other point of the same set."""

    def inside_share(queries: np.ndarray, centres: np.ndarray) -> float:
        radii = []
        for i, centre in enumerate(centres):
            others = np.delete(centres, i, axis=0)
            radii.append(np.sort(np.linalg.norm(others - centre, axis=1))[k - 1])
        hits = [any(np.linalg.norm(q - c) <= r for c, r in zip(centres, radii, strict=True)) for q in queries]
        return float(np.mean(hits))

    return inside_share(fake, real), inside_share(real, fake)


def test_precision_recall_of_identical_sets_is_one_and_of_far_sets_zero():
    real = np.random.default_rng(0).normal(size=(200, 8))
    assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_fake_from_one_mode_has_full_precision_and_low_recall():
    rng = np.random.default_rng(1)
    mode_a, mode_b = rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 50.0
    real = np.concatenate([mode_a, mode_b])
    precision, recall = metrics.precision_recall(real, mode_a[:50])
    assert precision == 1.0
    assert recall <= 0.5  # no real point of mode B is covered


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_the_definition(k):
    rng = np.random.default_rng(k)
    real, fake = rng.normal(size=(90, 5)), rng.normal(size=(70, 5)) + 0.8
    expected = _brute_precision_recall(real, fake, k)
    assert metrics.precision_recall(torch.from_numpy(real), fake, k=k) == pytest.approx(expected, abs=1e-12)
    assert all(0.0 < value < 1.0 for value in expected)  # a case where the answer is not trivially 0 or 1


def test_precision_recall_over_several_distance_blocks():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(700, 3)), rng.normal(size=(600, 3)) + 0.5  # more rows than one block of 512
    assert metrics.precision_recall(real, fake) == pytest.approx(_brute_precision_recall(real, fake, 3), abs=1e-12)


def test_a_point_on_a_hypersphere_counts_as_inside():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k = 1: every radius is 1
    fake = np.array([[4.0], [5.0], [-1.5]])  # 4 lies on the sphere of 3; 5 and -1.5 lie outside every sphere
    assert metrics.precision_recall(real, fake, k=1) == (pytest.approx(1 / 3), 1.0)


def test_precision_recall_needs_more_rows_than_k():
    with pytest.raises(ValueError, match="fake_features"):
        metrics.precision_recall(np.zeros((10, 2)), np.zeros((3, 2)), k=3)


def test_feature_net_trains_to_a_stated_accuracy(trained):
    net, report = trained
    assert report["accuracy"] > 0.9
    assert report["train_images"] == TRAIN - 300 and report["steps"] == 300 and report["classes"] == 10
    assert not net.training
    assert len(report["fingerprint"]) == len(report["data_fingerprint"]) == 16


def test_feature_net_training_is_deterministic(mnist):
    x, y = mnist[0][:400], mnist[1][:400]
    state = torch.random.get_rng_state()
    first = metrics.train_feature_net(x, y, 10, steps=10, batch_size=32)[1]["fingerprint"]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    assert metrics.train_feature_net(x, y, 10, steps=10, batch_size=32)[1]["fingerprint"] == first
    assert metrics.train_feature_net(x, y, 10, steps=10, batch_size=32, seed=1)[1]["fingerprint"] != first


def test_feature_net_resizes_inputs_and_refuses_wrong_channels():
    net = metrics.FeatureNet(1, 28, 28, 10, features=16)
    assert net(torch.rand(2, 1, 40, 36)).shape == (2, 16)
    assert net.logits(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        net(torch.rand(2, 3, 28, 28))


def test_colour_images_train_and_score():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 100, size=(200, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(200) % 2
    images[labels == 0, ..., 0] += 150  # class 0 is red, class 1 blue
    images[labels == 1, ..., 2] += 150
    net, report = metrics.train_feature_net(images, labels, 2, steps=30, batch_size=32)
    assert report["accuracy"] == 1.0
    red, blue = images[labels == 0], images[labels == 1]
    assert metrics.fid(red[:50], red[50:], net) < metrics.fid(red[:50], blue[:50], net) / 10


def test_features_of_feeds_the_net_channels_first_in_zero_one():
    net = metrics.FeatureNet(3, 6, 10, 2, features=8)
    pixels = np.random.default_rng(5).integers(0, 256, size=(5, 6, 10, 3), dtype=np.uint8)
    expected = net(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).detach()
    features = metrics.features_of(net, pixels, batch_size=2)
    assert features.dtype == torch.float64 and torch.allclose(features, expected.double(), atol=1e-6)


def test_fid_of_a_set_with_itself_is_zero(trained, unseen):
    assert abs(metrics.fid(unseen[0][:500], unseen[0][:500], trained[0])) < 1e-3


def test_fid_equals_the_closed_form_frechet_distance(trained, unseen):
    net, (x, _) = trained[0], unseen
    real, fake = x[:500], np.roll(x[500:1000], 2, axis=2)
    a, b = metrics.features_of(net, real).numpy(), metrics.features_of(net, fake).numpy()
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)
    assert metrics.fid(real, fake, net) == pytest.approx(expected, rel=1e-3)


def test_fid_reference_scores_like_fid_and_resets_only_the_fake_set(trained, unseen):
    net, x = trained[0], unseen[0]
    reference = metrics.FidReference(x[:500], net)
    first = reference.score(x[500:1000])
    noise = reference.score(metrics.noise_images(500, 28, 28, 1, seed=0))
    assert reference.score(x[500:1000]) == pytest.approx(first, rel=1e-6)
    assert first == pytest.approx(metrics.fid(x[:500], x[500:1000], net), rel=1e-6)
    assert noise > 10 * first
    with pytest.raises(ValueError, match="at least 2"):
        reference.score(x[:1])


def test_fid_is_symmetric_and_orders_real_shifted_and_noise(trained, unseen):
    net, x = trained[0], unseen[0]
    real, other = x[:500], x[500:1000]
    floor = metrics.fid(real, other, net)
    assert floor == pytest.approx(metrics.fid(other, real, net), rel=1e-3)
    shifted = metrics.fid(real, np.roll(other, 3, axis=1), net)
    ceiling = metrics.fid(real, metrics.noise_images(500, 28, 28, 1, seed=1), net)
    assert 0 < floor < shifted < ceiling
    assert 10 * floor < ceiling


def test_save_and_load_round_trip(trained, unseen, tmp_path):
    net, report = trained
    metrics.save_feature_net(net, report, str(tmp_path))
    loaded, loaded_report = metrics.load_feature_net(str(tmp_path))
    assert loaded_report == report
    x = unseen[0][:64]
    assert torch.equal(metrics.features_of(loaded, x), metrics.features_of(net, x))


def test_a_damaged_weights_file_is_refused(trained, tmp_path):
    net, report = trained
    metrics.save_feature_net(net, report, str(tmp_path))
    weights = tmp_path / metrics.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one weight's byte: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fingerprint"):
        metrics.load_feature_net(str(tmp_path))
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="damaged"):
        metrics.load_feature_net(str(tmp_path))


def test_save_refuses_a_report_of_another_net(trained, tmp_path):
    net, report = trained
    with pytest.raises(ValueError, match="fingerprint"):
        metrics.save_feature_net(net, {**report, "fingerprint": "0" * 16}, str(tmp_path))


def test_cached_feature_net_trains_once_per_data_and_options(mnist, tmp_path, monkeypatch):
    x, y = mnist[0][:300], mnist[1][:300]
    calls = []
    original = metrics.train_feature_net

    @functools.wraps(original)
    def counted(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(metrics, "train_feature_net", counted)
    net, report = metrics.cached_feature_net(x, y, 10, str(tmp_path), steps=3, batch_size=16)
    again, again_report = metrics.cached_feature_net(x, y, 10, str(tmp_path), steps=3, batch_size=16)
    assert len(calls) == 1
    assert again_report["fingerprint"] == report["fingerprint"]
    assert torch.equal(again.head.weight, net.head.weight)
    folders = [path.name for path in tmp_path.iterdir()]
    assert folders == [f"feature-net-{report['data_fingerprint']}-{folders[0].rsplit('-', 1)[1]}"]
    metrics.cached_feature_net(x, y, 10, str(tmp_path), steps=3, batch_size=16, seed=1)
    metrics.cached_feature_net(x[:200], y[:200], 10, str(tmp_path), steps=3, batch_size=16)
    assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 3


def test_class_accuracy_of_true_and_shuffled_labels(trained, unseen):
    net, (x, y) = trained[0], unseen
    assert metrics.class_accuracy(net, x[:1000], y[:1000]) > 0.9
    shuffled = np.random.default_rng(0).permutation(y[:1000])
    assert metrics.class_accuracy(net, x[:1000], shuffled) < 0.2
    with pytest.raises(ValueError, match="labels"):
        metrics.class_accuracy(net, x[:10], y[:9])


def test_noise_images_are_clipped_gaussians():
    noise = metrics.noise_images(200, 8, 8, 3, seed=4)
    assert noise.dtype == np.uint8 and noise.shape == (200, 8, 8, 3)
    assert np.array_equal(noise, metrics.noise_images(200, 8, 8, 3, seed=4))
    assert not np.array_equal(noise, metrics.noise_images(200, 8, 8, 3, seed=5))
    assert np.mean(noise == 0) == pytest.approx(0.1587, abs=0.01)  # P(N(0.5, 0.5^2) < 0)
    assert np.median(noise) == pytest.approx(127.5, abs=1.5)


def test_image_metrics_report_scores_floor_and_ceiling(trained, unseen):
    (net, report), (x, y) = trained, unseen
    noise = metrics.image_metrics(x[:400], metrics.noise_images(200, 28, 28, 1, seed=9), net, report=report)
    assert set(noise) == {"fid", "fid_floor", "fid_ceiling", "precision", "recall", "floor_precision",
                          "floor_recall", "feature_net", "n"}
    assert noise["n"] == 200 and noise["feature_net"] == report["fingerprint"]
    assert noise["fid_floor"] < noise["fid"] and noise["fid_floor"] < noise["fid_ceiling"]
    assert noise["precision"] < 0.1 < noise["floor_precision"]
    real = metrics.image_metrics(x[:200], x[400:600], net, floor_real=x[200:400], fake_labels=y[400:600])
    assert real["feature_net"] == "custom" and real["accuracy"] > 0.9
    assert real["fid_floor"] == pytest.approx(noise["fid_floor"], rel=1e-6)  # the same reference and floor sets
    assert real["fid"] < noise["fid_ceiling"] / 10


def test_image_metrics_refuses_too_few_real_images_and_mismatched_shapes(trained, unseen):
    net, x = trained[0], unseen[0]
    with pytest.raises(ValueError, match="2 x 200"):
        metrics.image_metrics(x[:300], x[300:500], net)
    with pytest.raises(ValueError, match=r"\(28, 28, 1\).*\(28, 28, 3\)"):
        metrics.image_metrics(x[:400], np.repeat(x[400:600], 3, axis=3), net)


class _RecordingInception(nn.Module):
    """A stand-in for torch-fidelity's network: records what it is given."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen = images
        return images.float().mean(dim=(2, 3))


def test_inception_wrapper_feeds_three_channel_uint8():
    recorder = _RecordingInception()
    wrapper = metrics.InceptionFeatures(recorder)
    grey = torch.tensor([[[[0.0, 0.5], [1.0, 1 / 255]]]])  # [1, 1, 2, 2]
    assert wrapper(grey).dtype == torch.float32
    assert recorder.seen.dtype == torch.uint8 and recorder.seen.shape == (1, 3, 2, 2)
    assert recorder.seen[0, 2].tolist() == [[0, 128], [255, 1]]
    with pytest.raises(ValueError, match="1 or 3"):
        wrapper(torch.rand(1, 2, 4, 4))


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_net_without_torch_fidelity_says_what_to_install():
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        metrics.inception_net("/nonexistent/weights.pth")


def test_inception_net_refuses_missing_weights(tmp_path):
    pytest.importorskip("torch_fidelity", reason="the Inception path needs torch-fidelity (pip install torch-fidelity)")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        metrics.inception_net(str(tmp_path / "missing.pth"))
