"""Conditions and guidance on a labelled mixture of Gaussians, where experts and router are analytic.

Components j = 0..5 are N(mu_j, s_j^2 I) with weights pi_j and a class label c_j; the partition puts
components {0, 1, 2} in cluster 0 and {3, 4, 5} in cluster 1, so each cluster holds both classes.
Expert k given c is the closed-form velocity of the components of cluster k with label c (all of
cluster k's components when c is null); the router p(k | x_t, t, c) is the closed-form posterior.
The conditional marginal velocity of the whole data set is computed independently, by Tweedie's
formula on the autograd score of p(x_t | c).
"""

import math

import pytest
import torch
from torch import nn

from archipelago.experts.batch import FieldSpec
from archipelago.experts.conditions import Condition, condition_batch
from archipelago.experts.paths import GaussianPath
from archipelago.experts.solvers import draw_prior, integrate
from archipelago.router.ensemble import Ensemble
from archipelago.router.training import Router

MU = torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, 4.0], [-2.0, -3.0], [2.5, -2.0], [0.5, 1.5]], dtype=torch.float64)
S = torch.tensor([0.5, 0.8, 0.3, 0.6, 0.4, 0.7], dtype=torch.float64)
PI = torch.tensor([0.2, 0.15, 0.15, 0.1, 0.25, 0.15], dtype=torch.float64)
LABEL = torch.tensor([0, 1, 0, 1, 0, 1])
CLUSTER = torch.tensor([0, 0, 0, 1, 1, 1])
CONDITIONS = {"label": Condition("label", classes=("even", "odd"))}
FIELDS = {"x": FieldSpec(GaussianPath())}
NULL = 2


def log_density(x, t):
    """log pi_j + log N(x_t; (1 - t) mu_j, ((1 - t)^2 s_j^2 + t^2) I) for every component, [B, J]."""
    var = (1 - t[:, None]) ** 2 * S**2 + t[:, None] ** 2
    sq = ((x[:, None, :] - (1 - t[:, None, None]) * MU) ** 2).sum(-1)
    return torch.log(PI) - 0.5 * sq / var - 0.5 * x.shape[1] * torch.log(2 * math.pi * var)


def allowed(label, cluster=None):
    """[B, J]: the components a sample with this label (null: any) may come from, within a cluster."""
    ok = (label[:, None] == NULL) | (LABEL[None, :] == label[:, None])
    return ok if cluster is None else ok & (CLUSTER[None, :] == cluster)


def component_velocity(x, t):
    """E[eps - x_0 | x_t, component j] for every component, [B, J, D]."""
    var = (1 - t[:, None]) ** 2 * S**2 + t[:, None] ** 2  # [B, J]
    x0 = MU + ((1 - t[:, None]) * S**2 / var)[..., None] * (x[:, None, :] - (1 - t[:, None, None]) * MU)
    return (x[:, None, :] - x0) / t[:, None, None]


class AnalyticExpert(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x_t, t):
        logits = log_density(x_t["x"], t).masked_fill(~allowed(x_t["label"], self.k), -math.inf)
        weights = logits.softmax(-1)  # p(j | x_t, k, c)
        return {"x": (weights[..., None] * component_velocity(x_t["x"], t)).sum(1)}


class AnalyticRouterNet(nn.Module):
    def forward(self, x_t, t):
        logits = log_density(x_t["x"], t).masked_fill(~allowed(x_t["label"]), -math.inf)
        return torch.stack([torch.logsumexp(logits[:, k == CLUSTER], 1) for k in range(2)], 1)


def marginal_velocity(x, t, label):
    """The velocity of p(x_t | c) (of p(x_t) where c is null), through Tweedie on the autograd score."""
    x = x.detach().requires_grad_(True)
    logits = log_density(x, t).masked_fill(~allowed(label), -math.inf)
    (score,) = torch.autograd.grad(torch.logsumexp(logits, 1).sum(), x)
    x0 = (x + t[:, None] ** 2 * score) / (1 - t[:, None])
    return ((x - x0) / t[:, None]).detach()


def ensemble(strategy="full", guidance=1.0):
    experts = [AnalyticExpert(k) for k in range(2)]
    return Ensemble(experts, Router(AnalyticRouterNet(), FIELDS), FIELDS, strategy, conditions=CONDITIONS,
                    guidance=guidance)


@pytest.fixture
def noisy():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 2, generator=g, dtype=torch.float64) * 3
    t = torch.rand(300, generator=g, dtype=torch.float64) * 0.96 + 0.02
    label = torch.tensor([0, 1, NULL] * 100)
    return x, t, label


def test_conditional_full_mixture_is_the_conditional_marginal_velocity(noisy):
    x, t, label = noisy
    mixed = ensemble("full")({"x": x, "label": label}, t)["x"]
    torch.testing.assert_close(mixed, marginal_velocity(x, t, label), rtol=0, atol=1e-9)


def test_guided_full_mixture_is_guidance_of_the_monolith(noisy):
    """Guidance on the mixed fields is classifier-free guidance of the whole data set's fields."""
    x, t, _ = noisy
    label = torch.tensor([0, 1] * 150)
    guided = ensemble("full", guidance=2.5)({"x": x, "label": label}, t)["x"]
    conditional = marginal_velocity(x, t, label)
    unconditional = marginal_velocity(x, t, torch.full_like(label, NULL))
    torch.testing.assert_close(guided, unconditional + 2.5 * (conditional - unconditional), rtol=0, atol=1e-9)


@pytest.mark.parametrize("strategy", ["full", "top1", "topk"])
def test_guidance_at_scale_one_is_plain_conditional_sampling(strategy):
    """(Euler: the closed-form velocity is singular at t = 0, where Heun and RK4 would evaluate it.)"""
    g = torch.Generator().manual_seed(0)
    x_1 = draw_prior(FIELDS, {"x": torch.zeros(64, 2, dtype=torch.float64)}, g)
    x_1.update(condition_batch(CONDITIONS, {"label": ["even", "odd"] * 32}, 64))
    conditional = integrate(ensemble(strategy), x_1, FIELDS, "euler", 40)
    neutral = integrate(ensemble(strategy, guidance=1.0), x_1, FIELDS, "euler", 40)
    stronger = integrate(ensemble(strategy, guidance=3.0), x_1, FIELDS, "euler", 40)
    assert torch.equal(neutral["x"], conditional["x"])
    assert not torch.allclose(stronger["x"], conditional["x"])


def test_conditional_samples_come_from_their_class():
    """Conditional sampling of the full mixture lands on components of the requested class."""
    g = torch.Generator().manual_seed(1)
    x_1 = draw_prior(FIELDS, {"x": torch.zeros(400, 2, dtype=torch.float64)}, g)
    x_1.update(condition_batch(CONDITIONS, {"label": "odd"}, 400))
    out = integrate(ensemble("full"), x_1, FIELDS, "euler", 100)["x"]
    odd = torch.nonzero(LABEL == 1).squeeze(1)
    j = odd[torch.multinomial(PI[odd], 4000, replacement=True, generator=g)]
    real = MU[j] + S[j, None] * torch.randn(4000, 2, generator=g, dtype=torch.float64)

    def share_odd(x):  # the share classified odd by the nearest component mean
        return (LABEL[((x[:, None, :] - MU) ** 2).sum(-1).argmin(1)] == 1).double().mean()

    assert share_odd(real) > 0.9
    assert abs(share_odd(out) - share_odd(real)) < 0.03


def test_guidance_without_conditions_is_an_error():
    with pytest.raises(ValueError, match="guidance 2.0 needs a domain with conditions"):
        Ensemble([AnalyticExpert(0)], None, FIELDS, "oracle", assignment=torch.zeros(1, dtype=torch.long),
                 guidance=2.0)


def test_condition_values_are_checked():
    with pytest.raises(ValueError, match="no class 'three'"):
        condition_batch(CONDITIONS, {"label": "three"}, 4)
    with pytest.raises(ValueError, match=r"unknown condition\(s\) \['colour'\]"):
        condition_batch(CONDITIONS, {"colour": "red"}, 4)
    with pytest.raises(ValueError, match="3 values for 4 samples"):
        condition_batch(CONDITIONS, {"label": [0, 1, 0]}, 4)
    assert condition_batch(CONDITIONS, {}, 3)["label"].tolist() == [NULL] * 3
