"""Tests of the time-series networks: shapes, adaLN-Zero start, time conditioning, a tiny fit."""

import pytest
import torch
from torch import nn

from archipelago.domains.timeseries.networks import (
    AdaLNBlock,
    DenoiserConfig,
    RouterConfig,
    TimeSeriesDenoiser,
    TimeSeriesRouterNet,
    TimestepEmbedder,
)

B, L, C, K = 4, 12, 3, 5


def tiny_denoiser(seed: int = 0) -> TimeSeriesDenoiser:
    config = DenoiserConfig(channels=C, length=L, width=32, depth=2, heads=4)
    return TimeSeriesDenoiser(config, generator=torch.Generator().manual_seed(seed))


def tiny_router(seed: int = 0) -> TimeSeriesRouterNet:
    config = RouterConfig(channels=C, length=L, num_experts=K, width=32, depth=2, heads=4)
    return TimeSeriesRouterNet(config, generator=torch.Generator().manual_seed(seed))


def perturb(model: nn.Module) -> nn.Module:
    """Move every parameter off its (partly zero) initialisation, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, L, C, generator=generator)}, torch.rand(B, generator=generator)


def test_denoiser_shape_and_zero_at_init():
    x_t, t = batch()
    out = tiny_denoiser()(x_t, t)
    assert set(out) == {"x"} and out["x"].shape == (B, L, C)
    assert torch.equal(out["x"], torch.zeros(B, L, C))


def test_blocks_start_as_identity():
    block = AdaLNBlock(width=16, heads=2)
    for module in block.modules():  # give the non-adaLN layers random weights
        if isinstance(module, nn.Linear) and module is not block.ada[-1]:
            nn.init.normal_(module.weight)
    h, c = torch.randn(2, 7, 16), torch.randn(2, 16)
    assert torch.equal(block(h, c), h)


def test_router_shape_and_uniform_at_init():
    x_t, t = batch()
    logits = tiny_router()(x_t, t)
    assert logits.shape == (B, K)
    assert torch.equal(logits, torch.zeros(B, K))


@pytest.mark.parametrize("make", [tiny_denoiser, tiny_router])
def test_networks_respond_to_t_and_x(make):
    model = perturb(make())
    x_t, t = batch()

    def output(x, time):
        out = model({"x": x}, time)
        return out["x"] if isinstance(out, dict) else out

    base = output(x_t["x"], t)
    assert not torch.allclose(base, output(x_t["x"], 1 - t))
    assert not torch.allclose(base, output(x_t["x"] + 0.5, t))


def test_generator_makes_init_independent_of_global_state():
    torch.manual_seed(123)
    a = tiny_denoiser(seed=7)
    torch.manual_seed(456)
    b = tiny_denoiser(seed=7)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_timestep_embedder_distinguishes_nearby_times():
    embedder = TimestepEmbedder(width=16)
    sinusoid = embedder.sinusoid(torch.tensor([0.0, 0.01]))  # [2, 256]
    assert sinusoid.shape == (2, 256)
    assert (sinusoid[0] - sinusoid[1]).abs().max() > 0.5


def test_wrong_input_shape_is_a_clear_error():
    x_t, t = batch()
    with pytest.raises(ValueError, match=rf"\[B, {L}, {C}\]"):
        tiny_denoiser()({"x": x_t["x"][:, :-1]}, t)
    with pytest.raises(ValueError, match=r"t of shape \[B\]"):
        tiny_router()(x_t, t[0])
    with pytest.raises(ValueError, match="divide"):
        DenoiserConfig(channels=C, length=L, width=30, heads=4)


def test_denoiser_fits_a_tiny_batch():
    torch.manual_seed(0)
    model = tiny_denoiser()
    x_t, t = batch()
    target = torch.sin(torch.linspace(0, 3, L))[None, :, None].expand(B, L, C)  # [B, L, C]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = (model(x_t, t)["x"] - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_router_fits_a_tiny_batch():
    model = tiny_router()
    x_t, t = batch()
    labels = torch.arange(B) % K
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x_t, t), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(K))).item(), abs=1e-6)
    assert losses[-1] < 0.5 * losses[0]


def test_training_is_bit_reproducible():
    def train() -> torch.Tensor:
        model = tiny_denoiser()
        x_t, t = batch()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(3):
            loss = (model(x_t, t)["x"] - x_t["x"]).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model(x_t, t)["x"]

    assert torch.equal(train(), train())
