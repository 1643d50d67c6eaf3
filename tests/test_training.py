"""train_expert: checkpoints, exact resume, and clear errors on mismatched checkpoints."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from archipelago.experts.checkpoint import latest_checkpoint, load_checkpoint
from archipelago.experts.denoiser import denoising_loss
from archipelago.experts.training import CheckpointMismatch, ExpertConfig, TrainConfig, derive_seed, train_expert
from tests.toy_domains import VectorDomain


@pytest.fixture
def data():
    domain = VectorDomain(dim=3)
    x = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    return domain, domain.samples(domain.ingest(x))


def config(steps, **train):
    return ExpertConfig(partition=1, train=TrainConfig(steps=steps, batch_size=16, warmup_steps=3,
                                                       checkpoint_every=4, progress=False, **train))


def test_resume_gives_the_same_weights_as_one_run(tmp_path, data):
    domain, samples = data
    straight = train_expert(config(10), domain, samples, str(tmp_path / "straight"))
    first = train_expert(config(5), domain, samples, str(tmp_path / "resumed"))
    resumed = train_expert(config(10), domain, samples, str(tmp_path / "resumed"))
    assert (first.resumed_from, resumed.resumed_from) == (0, 5)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a.model.keys() == b.model.keys() and a.state.keys() == b.state.keys()
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    for key in a.state:
        assert torch.equal(a.state[key], b.state[key]), key


def test_checkpoint_records_what_made_it(tmp_path, data):
    domain, samples = data
    result = train_expert(config(4), domain, samples, str(tmp_path))
    meta = load_checkpoint(result.checkpoint).meta
    assert meta["domain"] == "vectors" and meta["domain_config"] == {"dim": 3}
    assert (meta["partition"], meta["prediction"], meta["step"]) == (1, "velocity", 4)
    assert meta["data_fingerprint"] == samples.fingerprint() and meta["seed"] == 0
    assert latest_checkpoint(str(tmp_path)) == result.checkpoint
    assert {p.name for p in tmp_path.iterdir()} == {"LATEST", "step-00000004"}


def test_resume_refuses_another_config(tmp_path, data):
    domain, samples = data
    train_expert(config(4), domain, samples, str(tmp_path))
    with pytest.raises(CheckpointMismatch, match="lr: checkpoint 0.001 vs now 0.01"):
        train_expert(config(8, lr=0.01), domain, samples, str(tmp_path))


def test_resume_refuses_other_data(tmp_path, data):
    domain, samples = data
    train_expert(config(4), domain, samples, str(tmp_path))
    other = domain.samples(domain.ingest(np.zeros((10, 3), dtype=np.float32)))
    with pytest.raises(CheckpointMismatch, match="trained on data"):
        train_expert(config(8), domain, other, str(tmp_path))


def test_loss_goes_down_and_logs_reach_the_callback(tmp_path, data):
    domain, samples = data
    logs = []
    train_expert(config(60, lr=1e-2, log_every=20), domain, samples, str(tmp_path),
                 on_log=lambda s, m: logs.append((s, m)))
    assert [s for s, _ in logs] == [20, 40, 60]
    assert set(logs[0][1]) == {"loss", "lr", "samples_per_s", "wall_time"}
    assert logs[-1][1]["loss"] < logs[0][1]["loss"]


def test_unknown_config_key_is_refused():
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig(stepz=3)


def test_expert_seeds_differ_and_repeat():
    assert derive_seed(0, "expert", 1) == derive_seed(0, "expert", 1) != derive_seed(0, "expert", 2)


def test_a_fields_weight_scales_its_loss(data):
    """FieldSpec.weight multiplies the field's term of the training loss, and nothing else."""
    domain, samples = data
    net = domain.denoiser_network()
    batch = samples.batch(torch.arange(32))
    plain = domain.fields
    weighted = {name: replace(spec, weight=3.0) for name, spec in plain.items()}
    losses = [denoising_loss(net, fields, batch, torch.Generator().manual_seed(0)) for fields in (plain, weighted)]
    assert torch.allclose(losses[1], 3.0 * losses[0])
