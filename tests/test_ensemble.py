"""The DDM identity on a mixture of Gaussians, where experts and router are analytic.

Data: K Gaussian components N(mu_k, s_k^2 I) with weights pi_k, partitioned by component. Under
x_t = (1 - t) x_0 + t eps, component k gives x_t ~ N((1 - t) mu_k, ((1 - t)^2 s_k^2 + t^2) I), so
the optimal expert velocity E[eps - x_0 | x_t, k] and the posterior p(k | x_t, t) are closed-form.
The marginal velocity is computed independently, through Tweedie's formula on the autograd score
of the mixture density.
"""

import math

import pytest
import torch
from torch import nn

from archipelago.experts.batch import FieldSpec
from archipelago.experts.checkpoint import ema_weights
from archipelago.experts.paths import GaussianPath
from archipelago.experts.training import TrainConfig
from archipelago.router.ensemble import Ensemble, Strategy, routing_weights
from archipelago.router.training import Router, RouterConfig, train_router
from tests.toy_domains import VectorDomain

MU = torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, 4.0]], dtype=torch.float64)
S = torch.tensor([0.5, 0.8, 0.3], dtype=torch.float64)
PI = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
FIELDS = {"x": FieldSpec(GaussianPath())}


def component_log_density(x, t):
    var = (1 - t[:, None]) ** 2 * S**2 + t[:, None] ** 2  # [B, K]
    sq = ((x[:, None, :] - (1 - t[:, None, None]) * MU) ** 2).sum(-1)  # [B, K]
    return -0.5 * sq / var - 0.5 * x.shape[1] * torch.log(2 * math.pi * var)


def analytic_posterior(x, t):
    return (torch.log(PI) + component_log_density(x, t)).softmax(-1)


class AnalyticExpert(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x_t, t):
        x, t = x_t["x"], t[:, None]
        var = (1 - t) ** 2 * S[self.k] ** 2 + t**2
        x0 = MU[self.k] + (1 - t) * S[self.k] ** 2 / var * (x - (1 - t) * MU[self.k])
        return {"x": (x - x0) / t}


class AnalyticRouterNet(nn.Module):
    def forward(self, x_t, t):
        return torch.log(PI) + component_log_density(x_t["x"], t)


def marginal_velocity(x, t):
    x = x.detach().requires_grad_(True)
    log_p = torch.logsumexp(torch.log(PI) + component_log_density(x, t), dim=1).sum()
    (score,) = torch.autograd.grad(log_p, x)
    x0 = (x + t[:, None] ** 2 * score) / (1 - t[:, None])
    return ((x - x0) / t[:, None]).detach()


def analytic_ensemble(strategy, **kwargs):
    experts = [AnalyticExpert(k) for k in range(3)]
    return Ensemble(experts, Router(AnalyticRouterNet(), FIELDS), FIELDS, strategy=strategy, **kwargs)


@pytest.fixture
def noisy_points():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 2, generator=g, dtype=torch.float64) * 3
    t = torch.rand(256, generator=g, dtype=torch.float64) * 0.96 + 0.02
    return x, t


def test_full_mixture_of_optimal_experts_is_the_marginal_velocity(noisy_points):
    x, t = noisy_points
    ensemble = analytic_ensemble("full")
    torch.testing.assert_close(ensemble({"x": x}, t)["x"], marginal_velocity(x, t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("strategy,calls", [("full", 3), ("topk", 2), ("top1", 1)])
def test_only_chosen_experts_run(noisy_points, strategy, calls):
    x, t = noisy_points
    ensemble = analytic_ensemble(strategy, top_k=2)
    ensemble({"x": x}, t)
    assert ensemble.evaluations.expert == calls * len(x)
    assert ensemble.evaluations.router == len(x)


def test_top1_matches_the_chosen_expert_sample_by_sample(noisy_points):
    x, t = noisy_points
    chosen = analytic_posterior(x, t).argmax(1)
    out = analytic_ensemble("top1")({"x": x}, t)["x"]
    for k in range(3):
        rows = chosen == k
        torch.testing.assert_close(out[rows], AnalyticExpert(k)({"x": x[rows]}, t[rows])["x"])


def test_oracle_uses_the_assignment_and_no_router(noisy_points):
    x, t = noisy_points
    assignment = torch.arange(len(x)) % 3
    ensemble = Ensemble([AnalyticExpert(k) for k in range(3)], None, FIELDS, "oracle", assignment=assignment)
    out = ensemble({"x": x}, t)["x"]
    torch.testing.assert_close(out[1::3], AnalyticExpert(1)({"x": x[1::3]}, t[1::3])["x"])
    assert ensemble.evaluations.router == 0 and ensemble.evaluations.expert == len(x)


def test_topk_weights_are_renormalized():
    posterior = torch.tensor([[0.5, 0.3, 0.2]])
    torch.testing.assert_close(routing_weights(posterior, Strategy.TOPK, 2), torch.tensor([[0.625, 0.375, 0.0]]))
    torch.testing.assert_close(routing_weights(posterior, Strategy.TOP1), torch.tensor([[1.0, 0.0, 0.0]]))


def test_strategy_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="assignment"):
        Ensemble([AnalyticExpert(0)], None, FIELDS, "sample")
    with pytest.raises(ValueError, match="router"):
        Ensemble([AnalyticExpert(0), AnalyticExpert(1)], None, FIELDS, "full")
    Ensemble([AnalyticExpert(0)], None, FIELDS, "full")  # one network (a student) has nothing to route
    with pytest.raises(ValueError, match="'best'"):
        Ensemble([AnalyticExpert(0)], None, FIELDS, "best")


def test_trained_router_approaches_the_analytic_posterior(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.multinomial(PI, 4000, replacement=True, generator=g)
    x0 = MU[labels] + S[labels, None] * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    domain = VectorDomain(dim=2)
    samples = domain.samples(domain.ingest(x0.numpy()))
    config = RouterConfig(num_experts=3, train=TrainConfig(steps=800, batch_size=256, lr=3e-3, warmup_steps=50,
                                                           progress=False, ema_decay=0.99))
    result = train_router(config, domain, samples, labels, str(tmp_path / "router"))
    router = Router(domain.router_network(3), domain.fields)
    router.load_state_dict(ema_weights(result.checkpoint))
    test_labels = torch.multinomial(PI, 2000, replacement=True, generator=g)
    x0 = MU[test_labels] + S[test_labels, None] * torch.randn(2000, 2, generator=g, dtype=torch.float64)
    t = torch.rand(2000, generator=g, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(2000, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        learned = router.posterior({"x": x_t.float()}, t.float()).double()
    total_variation = 0.5 * (learned - analytic_posterior(x_t, t)).abs().sum(1).mean()
    assert total_variation < 0.06, total_variation


def test_a_single_expert_needs_no_router_call(noisy_points):
    x, t = noisy_points
    ensemble = Ensemble([AnalyticExpert(0)], Router(AnalyticRouterNet(), FIELDS), FIELDS, "top1")
    torch.testing.assert_close(ensemble({"x": x}, t)["x"], AnalyticExpert(0)({"x": x}, t)["x"])
    assert (ensemble.evaluations.expert, ensemble.evaluations.router) == (len(x), 0)
