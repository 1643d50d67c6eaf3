"""A toy two-field domain (ragged points on a torus, one categorical label per point) trains and
samples through the same code as every other domain: proof that the path interface fits
periodic and discrete fields."""

import pytest
import torch

from archipelago.experts.batch import select
from archipelago.experts.checkpoint import ema_weights
from archipelago.experts.denoiser import Denoiser
from archipelago.experts.paths import MaskedPath, TorusPath
from archipelago.experts.solvers import draw_prior, integrate
from archipelago.experts.training import ExpertConfig, TrainConfig, train_expert
from archipelago.router.ensemble import Ensemble, draw_assignment
from archipelago.router.partition import kmeans_partition
from archipelago.router.training import Router, RouterConfig, train_router
from tests.toy_domains import PointSetDomain, point_sets


def _ema(module, checkpoint):
    module.load_state_dict(ema_weights(checkpoint))
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pointsets")
    domain = PointSetDomain()
    table = domain.ingest(point_sets(120))
    partition = kmeans_partition(domain.features(table), 2, seed=0)
    train = TrainConfig(steps=30, batch_size=16, warmup_steps=5, progress=False)
    experts = []
    for k in range(2):
        part = domain.samples(table.filter(torch.tensor(partition.labels == k).numpy()))
        result = train_expert(ExpertConfig(partition=k, train=train), domain, part, str(root / f"expert-{k}"))
        experts.append(Denoiser(_ema(domain.denoiser_network(), result.checkpoint), domain.fields).eval())
    labels = torch.tensor(partition.labels)
    result = train_router(RouterConfig(num_experts=2, train=train), domain, domain.samples(table), labels,
                          str(root / "router"))
    router = _ema(Router(domain.router_network(2), domain.fields), result.checkpoint).eval()
    return domain, experts, router


@pytest.mark.parametrize("strategy", ["full", "topk", "top1", "sample", "oracle"])
def test_every_strategy_samples_valid_point_sets(trained, strategy):
    domain, experts, router = trained
    g = torch.Generator().manual_seed(0)
    template = domain.template(6, g)
    x_1 = draw_prior(domain.fields, template, g)
    assert (x_1["label"] == 3).all() and ((x_1["pos"] >= 0) & (x_1["pos"] < 1)).all()
    assignment = None
    if strategy == "sample":
        assignment = draw_assignment(router, x_1, domain.fields, g)
    elif strategy == "oracle":
        assignment = torch.tensor([0, 1, 0, 1, 0, 1])
    ensemble = Ensemble(experts, router, domain.fields, strategy, top_k=2, assignment=assignment)
    out = integrate(ensemble, x_1, domain.fields, solver="heun", steps=8, generator=g)
    assert torch.equal(out["batch"], template["batch"])
    assert ((out["pos"] >= 0) & (out["pos"] < 1)).all()
    assert ((out["label"] >= 0) & (out["label"] < 3)).all()  # every mask revealed by t = 0
    sets = domain.decode(out)
    assert [len(p) for p, _ in sets] == torch.bincount(template["batch"]).tolist()


def test_select_keeps_ragged_rows_together():
    batch = {"pos": torch.arange(10.0)[:, None], "label": torch.arange(10),
             "batch": torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])}
    domain = PointSetDomain()
    sub, rows = select(batch, domain.fields, torch.tensor([1, 3]))
    assert sub["batch"].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert sub["label"].tolist() == [2, 3, 4, 6, 7, 8, 9] and rows["pos"].tolist() == [2, 3, 4, 6, 7, 8, 9]


def test_masked_path_reveals_everything_at_zero_and_nothing_at_one():
    path = MaskedPath(4)
    x_0 = torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(0)
    assert (path.sample(x_0, torch.ones(4), g, "x0").x_t == 4).all()
    assert torch.equal(path.sample(x_0, torch.zeros(4), g, "x0").x_t, x_0)
    posterior = torch.nn.functional.one_hot(x_0, 4).float()
    out = path.step(torch.full((4,), 4), posterior, torch.full((4,), 0.5), torch.zeros(4), g)
    assert torch.equal(out, x_0)


def test_torus_path_velocity_is_the_shortest_way():
    path = TorusPath()
    x_0 = torch.tensor([[0.95, 0.05]])
    sample = path.sample(x_0, torch.tensor([1.0]), torch.Generator().manual_seed(0), "velocity")
    assert (sample.target.abs() <= 0.5).all()
    torch.testing.assert_close(torch.remainder(x_0 + sample.target, 1.0), sample.x_t)
