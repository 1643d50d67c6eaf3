"""Damaged files and faults in the run directory: checksummed checkpoints, resume from the newest
intact one, non-finite losses and outputs, pruning, and SIGINT at a step boundary."""

from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pytest
import torch

from archipelago.experts import storage
from archipelago.experts.checkpoint import (
    LATEST,
    DamagedCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    step_folders,
)
from archipelago.experts.data import DenseSamples
from archipelago.experts.training import ExpertConfig, NonFiniteLoss, TrainConfig, run_training, train_expert
from archipelago.platform import sdk
from archipelago.router.ensemble import NonFiniteOutput
from tests.toy_domains import VectorDomain

DOMAIN = VectorDomain()
SAMPLES = DenseSamples({"x": torch.randn(64, 2, generator=torch.Generator().manual_seed(0))})


def _train(folder, steps=8, **settings) -> str:
    train = TrainConfig(steps=steps, batch_size=8, warmup_steps=1, checkpoint_every=2, progress=False, **settings)
    return train_expert(ExpertConfig(partition=0, train=train), DOMAIN, SAMPLES, str(folder)).checkpoint


def _weights(uri: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(uri).model


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same size, the tensor bytes overwritten (the header still parses)
        path.write_bytes(data[:-64] + bytes(range(64)))


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_a_damaged_checkpoint_is_named_and_training_resumes_from_the_newest_intact_one(tmp_path, how, caplog):
    reference = _weights(_train(tmp_path / "reference"))
    folder = tmp_path / "expert"
    _train(folder, steps=6, keep_checkpoints=5)
    damaged = folder / "step-00000006" / "model.safetensors"
    _damage(damaged, how)
    with pytest.raises(DamagedCheckpoint, match=f"{damaged}.* damaged"):
        load_checkpoint(str(folder / "step-00000006"))
    final = _train(folder, steps=8, keep_checkpoints=5)  # resumes at step 4, rewrites 6, goes on to 8
    assert "step-00000006/model.safetensors" in caplog.text
    assert all(torch.equal(reference[k], v) for k, v in _weights(final).items())


def test_checkpoints_are_pruned_to_the_newest_few(tmp_path):
    _train(tmp_path, steps=10, keep_checkpoints=2)
    assert step_folders(str(tmp_path)) == ["step-00000008", "step-00000010"]
    assert (tmp_path / LATEST).read_text() == "step-00000010"


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    _train(tmp_path, steps=4)
    before = _weights(latest_checkpoint(str(tmp_path)))
    calls = {"n": 0}

    def loss_fn(model, batch, generator):
        calls["n"] += 1
        out = model(batch, torch.zeros(len(batch["x"])))["x"].pow(2).mean()
        return out * float("nan") if calls["n"] == 2 else out

    config = TrainConfig(steps=8, batch_size=8, warmup_steps=1, checkpoint_every=1, progress=False)
    meta = {"config": {"partition": 0, "prediction": "velocity"}}
    with pytest.raises(NonFiniteLoss, match="at step 6 the loss is nan"):
        run_training(DOMAIN.denoiser_network(), loss_fn, SAMPLES, config, str(tmp_path), meta)
    # step 5 was written, step 6 never: no NaN reached a checkpoint
    assert storage.base_name(latest_checkpoint(str(tmp_path))) == "step-00000005"
    assert before.keys() == _weights(latest_checkpoint(str(tmp_path))).keys()
    assert all(torch.isfinite(v).all() for v in _weights(latest_checkpoint(str(tmp_path))).values())


def test_sigint_writes_a_checkpoint_at_the_step_boundary_and_resumes_exactly(tmp_path):
    reference = _weights(_train(tmp_path / "reference", steps=7))

    def interrupt_at_step_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C during step 3

    train = TrainConfig(steps=7, batch_size=8, warmup_steps=1, checkpoint_every=2, log_every=1, progress=False)
    # Python's own handler, as an interactive run has it: a shell that starts the tests in the
    # background hands them SIGINT ignored, and training then ignores it too.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt, match="holds step 3"):
            train_expert(ExpertConfig(partition=0, train=train), DOMAIN, SAMPLES, str(tmp_path / "expert"),
                         on_log=interrupt_at_step_3)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert storage.base_name(latest_checkpoint(str(tmp_path / "expert"))) == "step-00000003"
    final = _train(tmp_path / "expert", steps=7)
    assert all(torch.equal(reference[k], v) for k, v in _weights(final).items())


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> sdk.Run:
    tiny = {"steps": 4, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 2, "progress": False}
    data = np.random.default_rng(0).normal(size=(64, 2))
    return sdk.fit(data, str(tmp_path_factory.mktemp("runs") / "vectors"), domain=VectorDomain(), experts=2,
                   expert=tiny, router=tiny)


def test_sampling_a_damaged_expert_names_the_file_and_the_remedy(fitted, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(fitted.run_dir, run_dir)
    damaged = run_dir / "experts" / "expert-1" / "step-00000004" / "model.safetensors"
    _damage(damaged, "garbage")
    with pytest.raises(DamagedCheckpoint, match=rf"expert 1: {damaged}.*train-expert --expert 1"):
        sdk.load(str(run_dir)).sample(4, steps=2)


@pytest.mark.parametrize("name", ["run.json", "domain.json", "ensemble.json"])
def test_a_truncated_json_file_is_an_error_naming_it(fitted, tmp_path, name):
    run_dir = tmp_path / "copy"
    shutil.copytree(fitted.run_dir, run_dir)
    path = run_dir / name
    path.write_text(path.read_text()[:40])
    with pytest.raises(storage.DamagedFile, match=f"{path} is damaged: not valid JSON"):
        sdk.load(str(run_dir)).sample(4, steps=2)


def test_an_expert_that_returns_nan_stops_sampling_naming_it(fitted):
    run = sdk.load(fitted.run_dir)
    net = run.ensemble.experts[1].net
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteOutput, match="expert 1 returned non-finite 'x'"):
        run.sample(8, strategy="full", steps=2)
