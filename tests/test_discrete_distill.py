"""The few-step student of discrete fields: the coupled masked sampler, and a student that reads it.

The toy is two binary entries that are always equal, x = (0, 0) or (1, 1) with probability 1/2
each; its exact posterior is the teacher. A sampler that reveals both entries in one step draws
them independently, so a one-step student trained on posteriors alone makes them differ half the
time. A student that reads the coupled sampler's reveal noise learns which value the teacher's
trajectory would reach from that noise, and keeps the entries equal in one step.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from archipelago.domains.crystals.domain import CrystalDomain
from archipelago.domains.graphs import synthetic
from archipelago.domains.graphs.domain import GraphDomain
from archipelago.experts.batch import FieldSpec, noise_key, reveal_key
from archipelago.experts.conventions import Prediction
from archipelago.experts.data import DenseSamples
from archipelago.experts.distill import pair_starts, pairs_batch, reflow_loss
from archipelago.experts.embeddings import RevealEmbedding
from archipelago.experts.paths import MaskedPath
from archipelago.experts.solvers import draw_prior, integrate
from archipelago.platform import distill, sdk, steps, versions

PATH = MaskedPath(2)
FIELDS = {"x": FieldSpec(PATH)}
MASK = PATH.mask


def equal_pair_posterior(x_t: dict, t: torch.Tensor) -> dict:
    """The exact posterior of the toy: a revealed entry's value for both, else a fair coin."""
    x = x_t["x"]
    revealed = x != MASK
    value = torch.where(revealed, x, 0).amax(-1)  # the revealed value (both agree), 0 when none is
    p_one = torch.where(revealed.any(-1), value.float(), torch.full_like(value, 0.5, dtype=torch.float))
    posterior = torch.stack([1 - p_one, p_one], -1)  # [B, 2]
    return {"x": posterior[:, None, :].expand(-1, 2, -1)}


def mismatch(x: torch.Tensor) -> float:
    return float((x[:, 0] != x[:, 1]).float().mean())


def prior(n: int, seed: int, coupled: bool) -> dict:
    return draw_prior(FIELDS, {"x": torch.zeros(n, 2, dtype=torch.long)}, torch.Generator().manual_seed(seed),
                      coupled=coupled)


def test_the_coupled_sampler_keeps_the_law_and_is_a_function_of_its_noise():
    n, steps = 20_000, 4
    drawn = {}
    for coupled in (False, True):
        x_1 = prior(n, 0, coupled)
        drawn[coupled] = integrate(equal_pair_posterior, x_1, FIELDS, "euler", steps,
                                   torch.Generator().manual_seed(1))["x"]
    # P(both revealed in the same step) / 2 with reveal times uniform over 4 equal steps: 1/8
    for coupled, x in drawn.items():
        assert abs(mismatch(x) - 0.125) < 0.01, (coupled, mismatch(x))
        assert abs(float(x.float().mean()) - 0.5) < 0.01
    x_1 = prior(64, 2, coupled=True)
    again = [integrate(equal_pair_posterior, x_1, FIELDS, "euler", steps, torch.Generator().manual_seed(seed))["x"]
             for seed in (3, 4)]
    assert torch.equal(*again), "the coupled sampler drew from its generator"


class PairStudent(nn.Module):
    """Both entries' states, t and (when the batch has it) both entries' reveal noise -> logits [B, 2, 2]."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.reveal = RevealEmbedding(width)
        self.body = nn.Sequential(nn.Linear(2 * 3 + 1 + 2 * width, 2 * width), nn.SiLU(),
                                  nn.Linear(2 * width, 2 * width), nn.SiLU(), nn.Linear(2 * width, 4))

    def forward(self, x_t: dict, t: torch.Tensor) -> dict:
        x = x_t["x"]
        reveal = self.reveal(x_t, "x", MASK)
        reveal = torch.zeros(*x.shape, self.reveal.mlp[-1].out_features) if reveal is None else reveal
        inputs = torch.cat([nn.functional.one_hot(x, 3).float().flatten(1), t[:, None], reveal.flatten(1)], -1)
        return {"x": self.body(inputs).reshape(-1, 2, 2)}


def train_on_pairs(pairs: DenseSamples, steps: int) -> nn.Module:
    torch.manual_seed(0)
    student, g = PairStudent(), torch.Generator().manual_seed(5)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(steps):
        ids = torch.randint(0, len(pairs), (256,), generator=g)
        loss = reflow_loss(student, FIELDS, pairs.batch(ids), g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.eval()


def test_a_one_step_student_reading_the_reveal_noise_keeps_the_entries_joint():
    x_1 = prior(4096, 7, coupled=True)
    teacher_samples = integrate(equal_pair_posterior, x_1, FIELDS, "euler", 20)
    pairs = pairs_batch(teacher_samples, x_1, FIELDS)
    assert torch.equal(pairs[noise_key("x")], x_1[reveal_key("x")])  # the noise end of a discrete field
    starts = pair_starts(pairs, FIELDS)
    assert starts.keys() == x_1.keys() and all(torch.equal(starts[k], x_1[k]) for k in x_1)  # and back
    student = train_on_pairs(DenseSamples(pairs), steps=1500)
    with torch.no_grad():
        one_step = integrate(student, prior(4000, 8, coupled=True), FIELDS, "euler", 1)["x"]
        # the best any student of posteriors alone can do in one step: the exact posterior
        exact = integrate(equal_pair_posterior, prior(4000, 8, coupled=False), FIELDS, "euler", 1,
                          torch.Generator().manual_seed(9))
    rates = {"teacher, 20 steps": mismatch(teacher_samples["x"]), "student, 1 step": mismatch(one_step),
             "exact posterior, 1 step": mismatch(exact["x"])}
    print("share of unequal pairs:", rates)
    assert rates["exact posterior, 1 step"] > 0.45  # one step reveals both at once, independently
    assert rates["student, 1 step"] < 0.1
    assert abs(float(one_step.float().mean()) - 0.5) < 0.05  # and both values stay equally likely


def graph_student() -> tuple[nn.Module, dict, str]:
    domain = GraphDomain(max_nodes=20, width=16, edge_width=4, depth=1, heads=2, reveal_noise=True)
    domain.ingest(synthetic.benchmark("community-small")["train"][:4])
    template = domain.template(3, torch.Generator().manual_seed(0), {"nodes": [0] * 12 + [1]})
    return domain.denoiser_network(), draw_prior(domain.fields, template, torch.Generator().manual_seed(1),
                                                 coupled=True), "edge_type"


def crystal_student() -> tuple[nn.Module, dict, str]:
    domain = CrystalDomain(elements=["O", "Ti", "Sr"], lattice_mean=[1.4] * 3 + [0.0] * 3, lattice_std=[0.1] * 6,
                           width=16, depth=1, frequencies=2, reveal_noise=True)
    template = domain.template(3, torch.Generator().manual_seed(0), {"atoms": [0, 0, 0, 0, 1]})
    return domain.denoiser_network(), draw_prior(domain.fields, template, torch.Generator().manual_seed(1),
                                                 coupled=True), "atom_type"


@pytest.mark.parametrize("build", [graph_student, crystal_student])
def test_the_students_denoiser_reads_the_reveal_noise_from_a_zero_start(build):
    net, x_1, name = build()
    assert x_1[reveal_key(name)].shape == (*x_1[name].shape, 2)
    t = torch.ones(len(x_1["lattice"]) if "lattice" in x_1 else 3)
    plain = {k: v for k, v in x_1.items() if k != reveal_key(name)}
    torch.testing.assert_close(net(x_1, t)[name], net(plain, t)[name])  # zero at the start: the dense weights'
    net(x_1, t)[name].sum().backward()
    reveal = next(m for m in net.modules() if isinstance(m, RevealEmbedding))
    assert reveal.mlp[-1].weight.grad.abs().sum() > 0  # and it learns from the noise


TINY = {"steps": 6, "batch_size": 8, "warmup_steps": 2, "progress": False}


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory) -> sdk.Run:
    domain = GraphDomain(max_nodes=20, require_connected=True, width=16, edge_width=4, depth=1, heads=2,
                         router_width=8, router_depth=1)
    graphs = synthetic.benchmark("community-small")["train"][:16]
    return sdk.fit(graphs, str(tmp_path_factory.mktemp("graphs") / "run"), domain=domain, experts=2,
                   expert=TINY, router=TINY)


def test_a_graph_run_distils_a_student_that_samples_by_its_reveal_noise(graph_run):
    run = graph_run.distill(dense=TINY, reflow=TINY, pairs=6, pairs_per_shard=4,
                            teacher={"strategy": "full", "solver": "euler", "steps": 3})
    student = run._ensemble_on(torch.device("cpu"), "student")
    assert student.coupled and student.domain.config.reveal_noise is False  # the run's domain is unchanged
    assert student.experts[0].net.reveal_e is not None
    out = run.sample(5, model="student", solver="euler", steps=1, seed=0)
    assert len(out.items) == 5 and out.expert_calls_per_sample == 1
    assert out.batch[reveal_key("edge_type")].shape == (*out.batch["edge_type"].shape, 2)  # sampled coupled
    assert torch.equal(out.batch["edge_type"], run.sample(5, model="student", solver="euler", steps=1,
                                                          seed=0).batch["edge_type"])
    dense = run.sample(5, model="dense", solver="euler", steps=2, seed=0)
    assert reveal_key("edge_type") not in dense.batch and len(dense.items) == 5


def test_a_masked_fields_noise_end_must_be_its_reveal_noise():
    x_0 = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"a masked field's noise end is its reveal noise, float \(3, 2, 2\); "
                                         r"got torch.int64 \(3, 2\)"):
        PATH.sample(x_0, torch.full((3,), 0.5), None, Prediction.X0, noise=PATH.prior(x_0))


def test_pairs_made_before_the_coupled_sampler_are_refused_naming_the_folder(graph_run, tmp_path):
    run_dir = str(shutil.copytree(graph_run.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("students")))
    config = distill.DistillConfig(pairs=4, teacher={"strategy": "full", "solver": "euler", "steps": 2})
    version = versions.load(run_dir).get("version")
    uri = distill.make_pairs(run_dir, 0, config, version)
    old = distill.table_tensors(steps.read_table(uri))  # as the pairs were: the masked prior as noise end
    old[noise_key("edge_type")] = torch.full_like(old["edge_type"], graph_run.domain.fields["edge_type"].path.mask)
    steps.write_table(uri, distill.tensors_table(old))
    with pytest.raises(ValueError, match=r"holds no reveal noise for \['edge_type'\] .* delete .*students/v1/pairs"):
        distill.read_pairs(run_dir, config, graph_run.domain, version)
