"""The image domain (`domains/images/domain.py`, `networks.py`): diffusers denoisers in our convention, the
latent stage with a trained or a user's pretrained autoencoder, partition features, and a tiny run that
trains, samples with a class and guidance, and scores FID. The contract test covers every strategy."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from archipelago.domains.images import data
from archipelago.domains.images.domain import ImageDomain
from archipelago.domains.images.networks import (
    DENOISERS,
    ImageNetConfig,
    LatentCodec,
    RouterCNN,
    autoencoder,
)
from archipelago.experts.checkpoint import ema_weights, latest_checkpoint
from archipelago.experts.conditions import Condition
from archipelago.platform import sdk, steps
from tests.image_data import mnist_slice

TINY = {"steps": 12, "batch_size": 16, "warmup_steps": 2, "progress": False}
SMALL = {"size": (16, 16), "fit": "resize", "preset": "tiny", "router_width": 8, "router_depth": 1,
         "feature_components": 8, "feature_net_steps": 30}
DIGITS = Condition("label", classes=tuple("0123456789"))


def _batch(n: int = 4, channels: int = 1, side: int = 16) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(n, channels, side, side), "label": torch.tensor([0, 3, 10, 9][:n])}


@pytest.mark.parametrize("kind", sorted(DENOISERS))
def test_denoisers_give_a_velocity_per_pixel_and_use_the_class(kind):
    torch.manual_seed(0)
    net = DENOISERS[kind](ImageNetConfig(1, 16, 16, conditions=(DIGITS,)), "tiny")
    batch, t = _batch(), torch.rand(4)
    out = net(batch, t)["image"]
    assert out.shape == batch["image"].shape
    other = net({**batch, "label": torch.tensor([1, 1, 1, 1])}, t)["image"]
    assert not torch.allclose(out, other), "the class label changed nothing"


def test_the_dit_keeps_its_null_class_and_never_drops_labels_on_its_own():
    """diffusers' label embedding drops labels on the global random stream in training mode; ours must
    not (conditions are dropped by our training, with its seeded generator)."""
    net = DENOISERS["dit"](ImageNetConfig(1, 16, 16, conditions=(DIGITS,)), "tiny").train()
    batch = {"image": torch.randn(64, 1, 16, 16), "label": torch.arange(64) % 10}  # a 10% drop would hit ~6 of 64
    t = torch.rand(64)
    assert torch.equal(net(batch, t)["image"], net(batch, t)["image"])


def test_unconditional_denoisers_and_the_router_take_a_plain_batch():
    config = ImageNetConfig(3, 16, 16)
    batch = {"image": torch.randn(2, 3, 16, 16)}
    for kind in DENOISERS:
        assert DENOISERS[kind](config, "tiny")(batch, torch.rand(2))["image"].shape == (2, 3, 16, 16)
    assert RouterCNN(config, 5, width=8, depth=1)(batch, torch.rand(2)).shape == (2, 5)


@pytest.mark.parametrize(("kind", "config", "message"), [
    ("unet", ImageNetConfig(1, 15, 16), "not divisible by 2"),
    ("dit", ImageNetConfig(1, 16, 8), "square"),
    ("dit", ImageNetConfig(1, 16, 16, conditions=(Condition("size"),)), "categorical"),
])
def test_networks_refuse_shapes_and_conditions_they_cannot_take(kind, config, message):
    with pytest.raises(ValueError, match=message):
        DENOISERS[kind](config, "tiny")


def test_an_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown UNet preset 'huge'"):
        DENOISERS["unet"](ImageNetConfig(1, 16, 16), "huge")


def test_the_codec_estimates_its_latent_scale_while_it_trains():
    torch.manual_seed(0)
    codec = LatentCodec(autoencoder(1, 16, 16, "tiny", 2), scale=1.0, momentum=0.5)
    batch = _batch()
    for _ in range(20):
        codec.loss(batch, torch.Generator().manual_seed(0))
    latents = codec.encode(batch)["latent"]
    assert latents.shape == (4, 2, 8, 8)
    assert latents.std().item() == pytest.approx(1.0, rel=0.05)


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory) -> sdk.Run:
    images, labels = mnist_slice(96)
    return sdk.fit((images, labels), str(tmp_path_factory.mktemp("images") / "run"), domain=ImageDomain(**SMALL),
                   experts=2, expert=TINY, router=TINY)


def test_a_tiny_run_samples_a_class_with_guidance_and_scores_fid(pixel_run):
    out = pixel_run.sample(16, strategy="top1", steps=3, seed=0, conditions={"label": "7"}, guidance=2.0)
    assert len(out.items) == 16 and out.items[0].size == (16, 16) and out.items[0].info["label"] == "7"
    scores = pixel_run.evaluate(out)
    assert {"fid", "fid_floor", "fid_ceiling", "precision", "recall", "accuracy", "feature_net"} <= set(scores)
    assert 0 <= scores["fid_floor"] < scores["fid_ceiling"]  # real against real, noise against real
    assert isinstance(scores["feature_net"], str) and len(scores["feature_net"]) == 16


def test_sample_records_read_back_as_the_same_images(pixel_run):
    out = pixel_run.sample(4, strategy="full", steps=2, seed=3, conditions={"label": "1"})
    table = pixel_run.domain.sample_records(out.batch)
    again = pixel_run.domain.samples(pixel_run.domain.ingest(table, fit=False)).batch(torch.arange(4))
    assert np.array_equal(data.from_unit(again["image"]), data.from_unit(out.batch["image"]))
    assert again["label"].tolist() == [1] * 4


def test_pca_features_are_fitted_on_the_training_images(pixel_run):
    records = pixel_run.records()
    features = pixel_run.domain.features(records)
    assert features.shape == (96, 8)
    assert np.allclose(features.mean(0), 0.0, atol=1e-4)  # centred by the fitted mean
    assert features[:, 0].var() >= features[:, -1].var()  # components by explained variance


def mean_brightness(pixels: np.ndarray) -> np.ndarray:
    """A user's feature extractor, named as "tests.test_images:mean_brightness"."""
    return pixels.reshape(len(pixels), -1).mean(1, keepdims=True)


def test_a_users_feature_extractor_partitions_the_data():
    images, labels = mnist_slice(32)
    domain = ImageDomain(**SMALL, features="tests.test_images:mean_brightness")
    table = domain.ingest((images, labels))
    assert np.allclose(domain.features(table)[:, 0], data.table_to_images(table).pixels.reshape(32, -1).mean(1))
    with pytest.raises(ValueError, match="cannot import the feature extractor"):
        ImageDomain(**SMALL, features="tests.nowhere:f").features(table)


def test_dinov2_features_come_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the DINOv2 extractor needs Hugging Face transformers")
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, image_size=28, patch_size=7)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    images, labels = mnist_slice(24)
    domain = ImageDomain(**SMALL, features=f"dinov2:{tmp_path / 'dinov2'}")
    features = domain.features(domain.ingest((images, labels)))
    assert features.shape == (24, 16) and np.isfinite(features).all()
    assert np.linalg.matrix_rank(features) > 1  # different images, different embeddings
    with pytest.raises(ValueError, match="cannot load a DINOv2 model"):
        ImageDomain(**SMALL, features=f"dinov2:{tmp_path / 'missing'}").ingest((images, labels))


def _save_autoencoder(folder, in_channels: int = 1, latent_channels: int = 2) -> str:
    torch.manual_seed(1)
    model = AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(8, 16), norm_num_groups=8, sample_size=16, scaling_factor=0.5)
    model.save_pretrained(folder)
    return str(folder)


def test_a_pretrained_autoencoder_from_a_local_folder_is_stored_in_the_run_untouched(tmp_path):
    path = _save_autoencoder(tmp_path / "vae")
    images, labels = mnist_slice(48)
    run = sdk.fit((images, labels), str(tmp_path / "run"), domain=ImageDomain(**SMALL, autoencoder=path),
                  experts=2, expert=TINY, router=TINY, codec=TINY)
    assert run.domain.config.latent and run.domain.fields.keys() == {"latent"}
    checkpoint = latest_checkpoint(steps.codec_dir(run.run_dir))
    assert checkpoint.endswith("step-00000000")  # frozen: stored, not trained
    pretrained = AutoencoderKL.from_pretrained(path).state_dict()
    stored = ema_weights(checkpoint)
    assert stored["scale"].item() == 0.5  # the autoencoder's own scaling_factor
    assert all(torch.equal(stored[f"autoencoder.{k}"], v) for k, v in pretrained.items())
    out = run.sample(4, strategy="full", steps=2, seed=0)
    assert len(out.items) == 4 and out.items[0].size == (16, 16)
    shutil.rmtree(path)  # the run holds the autoencoder: it samples without the user's folder
    again = sdk.load(run.run_dir).sample(4, strategy="full", steps=2, seed=0)
    assert torch.equal(again.batch["image"], out.batch["image"])


def test_autoencoders_that_do_not_fit_the_data_or_the_denoiser_are_refused(tmp_path):
    images, labels = mnist_slice(16)
    rgb = _save_autoencoder(tmp_path / "rgb", in_channels=3)
    with pytest.raises(ValueError, match="encodes 3-channel images; the data has 1 channel"):
        ImageDomain(**SMALL, autoencoder=rgb).ingest((images, labels))
    grey = _save_autoencoder(tmp_path / "grey", latent_channels=2)
    with pytest.raises(ValueError, match="has 2 latent channels; the denoiser is configured for latent_channels=4"):
        ImageDomain(**SMALL, autoencoder=grey, latent_channels=4).ingest((images, labels))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ImageDomain(**SMALL, autoencoder=str(tmp_path / "missing")).ingest((images, labels))


def test_evaluate_needs_labelled_images_for_its_feature_network(pixel_run):
    out = pixel_run.sample(4, strategy="full", steps=2)
    unlabelled = pa.table({"id": ["a"], "pixels": [b"\0" * 256]}).replace_schema_metadata(
        {b"archipelago.image_shape": b"[16, 16, 1]"})
    with pytest.raises(ValueError, match="classifier trained on labelled images"):
        pixel_run.domain.evaluate(unlabelled, out.batch)
    with pytest.raises(ValueError, match="unknown evaluate options"):
        pixel_run.domain.evaluate(pixel_run.records(), out.batch, repeat=3, feature_net_dir="x")


def test_sample_grids_are_written_as_png_and_logged_to_mlflow(pixel_run, tmp_path):
    import mlflow

    from archipelago.platform import sample_files, tracking

    out = pixel_run.sample(9, strategy="top1", steps=2, seed=0)
    sample_files.write(str(tmp_path / "grid.png"), out, pixel_run.domain)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (3 * 16 + 2 * 2, 3 * 16 + 2 * 2)  # 3 x 3 tiles with 2-pixel gaps between
    store = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.check_tracking(store)
    parent = tracking.start_parent(store, "images", pixel_run.config.model_dump(mode="json"), pixel_run.run_dir)
    assert tracking.log_sample_grid(store, parent, pixel_run.run_dir, n=4)
    assert "samples.png" in [f.path for f in mlflow.MlflowClient(store).list_artifacts(parent)]
