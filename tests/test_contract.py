"""The contract test: every registered domain, and the toy domains that cover what time series does
not, pass the same steps without writing tests of their own.

For each case: ingest a tiny data set, fit two tiny experts and a router through the SDK, sample
with every routing strategy (with a condition and guidance where the domain has conditions, with
given entries where it takes them), decode to the domain's objects, round-trip the domain config,
evaluate, and load the MLflow model in a fresh process. A new domain adds one `Case` here first.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from archipelago.domains import DOMAINS
from archipelago.domains.crystals.domain import CrystalDomain
from archipelago.domains.graphs import synthetic
from archipelago.domains.graphs.domain import GraphDomain
from archipelago.domains.images.domain import ImageDomain
from archipelago.domains.timeseries.domain import TimeSeriesDomain
from archipelago.experts.domain import Domain
from archipelago.experts.solvers import Given
from archipelago.platform import sdk
from archipelago.router.ensemble import Strategy
from tests.crystal_data import PEROV_DEV, needs_perov
from tests.image_data import mnist_slice
from tests.toy_domains import PointSetDomain, VectorDomain, point_sets
from tests.toy_graphs import LatentVectorDomain, ToyGraphDomain, plane_vectors, toy_graphs

# MNIST at 16x16 with the smallest networks, and a feature network for FID trained for a few steps
TINY_IMAGES = {"size": (16, 16), "fit": "resize", "preset": "tiny", "router_width": 8, "router_depth": 1,
               "feature_components": 8, "feature_net_steps": 20}
TINY = {"steps": 12, "batch_size": 16, "warmup_steps": 2, "progress": False}
REPO = Path(__file__).resolve().parents[1]


def _forecast(run: sdk.Run, n: int) -> dict[str, Any]:
    """The first half of every window given (in the user's units), the second half free."""
    window = np.full((run.domain.config.window, run.domain.channels), np.nan)
    window[: len(window) // 2] = 0.5
    return {"x": window}


def _composition(run: sdk.Run, n: int) -> dict[str, Any]:
    """Node types given per graph, sizes varying: the graph analogue of structure prediction."""
    return {"node_type": [[i % 2 for i in range(3 + k % 3)] for k in range(n)]}


def _labelled_communities(count: int) -> list:
    """Community-small graphs with node labels (the community: "a" or "b") and a categorical size
    condition, so that the graph domain's node field, conditions and given labels are all exercised."""
    graphs = synthetic.community_small(count)
    for g in graphs:
        n = g.number_of_nodes()
        for i in g.nodes:
            g.nodes[i]["label"] = "a" if i < n // 2 else "b"
        g.graph["size"] = "small" if n < 16 else "large"
    return graphs


def _node_labels(run: sdk.Run, n: int) -> dict[str, Any]:
    """Node labels given per graph, sizes varying (the number of nodes follows the given labels)."""
    return {"node_type": [["a", "b"] * (2 + k % 2) for k in range(n)]}


def _compositions(run: sdk.Run, n: int) -> dict[str, Any]:
    """Structure prediction: the compositions (as species lists) of the run's first n crystals."""
    return {"atom_type": run.records().column("species").to_pylist()[:n]}


def _perov_rows(n: int) -> pd.DataFrame:
    """The first n rows of the shared perov_5_dev training split (the test skips where it is absent)."""
    needs_perov()
    return pd.read_csv(PEROV_DEV / "train.csv", nrows=n)


def _two_blobs(n: int) -> np.ndarray:
    centres = np.repeat([[3.0, 0.0], [-3.0, 0.0]], n // 2, axis=0)
    return centres + np.random.default_rng(0).normal(size=centres.shape)


@dataclass(frozen=True)
class Case:
    name: str
    domain: Callable[[], Domain]
    data: Callable[[], Any]
    conditions: dict[str, Any] = field(default_factory=dict)  # one value per condition the domain declares
    given: Callable[[sdk.Run, int], dict[str, Any]] | None = None  # given fields for n samples
    evaluate: dict[str, Any] = field(default_factory=dict)  # options that keep the metrics tiny
    settings: dict[str, Any] = field(default_factory=dict)  # more sdk.fit settings


CASES = [
    Case("timeseries", lambda: TimeSeriesDomain(window=8, width=16, depth=1, heads=2, router_width=16, router_depth=1),
         lambda: "sines:96", given=_forecast, evaluate={"metrics": ["correlational", "vds"], "repeats": 1}),
    Case("graphs", lambda: GraphDomain(max_nodes=20, conditions=["size"], width=16, edge_width=4, depth=1, heads=2,
                                       router_width=8, router_depth=1),
         lambda: _labelled_communities(32), conditions={"size": "small"}, given=_node_labels,
         evaluate={"train": _labelled_communities(8)}),
    Case("crystals", lambda: CrystalDomain(conditions=["heat_ref"], width=16, depth=1, frequencies=2, router_width=8,
                                           router_depth=1),
         lambda: _perov_rows(48), conditions={"heat_ref": 0.5}, given=_compositions,
         evaluate={"n_valid": 16, "workers": 1}),
    Case("images", lambda: ImageDomain(**TINY_IMAGES), lambda: mnist_slice(64), conditions={"label": "3"},
         evaluate={"metrics": ["fid", "fid_floor", "precision", "recall"]}),
    Case("latentimages", lambda: ImageDomain(**TINY_IMAGES, latent=True, autoencoder_preset="tiny", latent_channels=2),
         lambda: mnist_slice(64), conditions={"label": "3"}, settings={"codec": TINY},
         evaluate={"metrics": ["fid", "fid_floor", "fid_ceiling"]}),
    Case("vectors", VectorDomain, lambda: _two_blobs(96)),
    Case("pointsets", PointSetDomain, lambda: point_sets(96)),
    Case("toygraphs", ToyGraphDomain, lambda: toy_graphs(96), conditions={"family": "ring", "density": 0.3},
         given=_composition),
    Case("latentvectors", LatentVectorDomain, lambda: plane_vectors(96), settings={"codec": TINY}),
]
BY_NAME = {case.name: case for case in CASES}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Callable[[str], sdk.Run]:
    """Each case's run, fitted once on first use: two tiny experts and a router, in this process."""
    runs: dict[str, sdk.Run] = {}

    def get(name: str) -> sdk.Run:
        if name not in runs:
            case = BY_NAME[name]
            run_dir = tmp_path_factory.mktemp("contract") / name
            runs[name] = sdk.fit(case.data(), str(run_dir), domain=case.domain(), experts=2, expert=TINY,
                                 router=TINY, **case.settings)
        return runs[name]

    return get


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Two batches equal bit for bit (a null continuous condition is NaN in both)."""
    return a.keys() == b.keys() and all(torch.equal(a[k].nan_to_num(-9.0), b[k].nan_to_num(-9.0))
                                        if a[k].is_floating_point() else torch.equal(a[k], b[k]) for k in a)


def _finite(value: Any) -> bool:
    value = getattr(value, "mean", value)  # a Score of repeats, or a plain number
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_every_registered_domain_has_a_case():
    assert set(DOMAINS) <= set(BY_NAME), f"add a Case for {sorted(set(DOMAINS) - set(BY_NAME))}"


@pytest.mark.parametrize("name", BY_NAME)
def test_ingest_gives_records_that_batch_and_featurize(name):
    case = BY_NAME[name]
    domain = case.domain()
    table = domain.ingest(case.data())
    samples = domain.samples(table)
    features = domain.features(table)
    assert table.num_rows > 0 and len(samples) == table.num_rows
    assert features.shape[0] == table.num_rows and np.isfinite(features).all()
    batch = samples.batch(torch.arange(min(4, len(samples))))
    codec = domain.codec_network()
    fields = set(codec.inputs) if codec is not None else set(domain.fields)
    assert fields <= set(batch)


@pytest.mark.parametrize("name", BY_NAME)
def test_the_domain_config_round_trips(fitted, name):
    run = fitted(name)
    config = run.domain.to_config()
    assert json.loads(json.dumps(config)) == config
    assert type(run.domain).from_config(config).to_config() == config
    assert sdk.load(run.run_dir).domain.to_config() == config  # what a later process rebuilds


@pytest.mark.parametrize("name", BY_NAME)
def test_samples_are_attributed_and_cover_the_clusters(fitted, name):
    """Attribution's nearest records and coverage read samples back through `ingest(fit=False)` and
    `features`: every domain's decoded samples must be data of its own kind."""
    run = fitted(name)
    out = run.sample(6, strategy="full", steps=2, seed=1)
    frame = run.attribute(out, nearest=2)
    assert len(frame) == 6 and all(len(rows) == 2 for rows in frame["nearest_rows"])
    assert np.allclose(frame[[c for c in frame if c.startswith("w_")]].sum(axis=1), 1.0, atol=1e-5)
    assert 0.0 <= run.coverage(out)["total_variation"] <= 1.0
    assert out.trace.shape[0] == 6


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize("name", BY_NAME)
def test_every_strategy_samples_and_decodes(fitted, name, strategy):
    run = fitted(name)
    out = run.sample(6, strategy=strategy, steps=2, seed=1)
    assert len(out.items) == 6
    assert out.strategy == strategy.value
    floats = [v for k, v in out.batch.items() if v.is_floating_point() and k not in run.domain.conditions]
    assert all(torch.isfinite(v).all() for v in floats)  # (a null continuous condition is NaN)
    assert (out.assignment is not None) == (strategy in (Strategy.SAMPLE, Strategy.ORACLE))
    again = run.sample(6, strategy=strategy, steps=2, seed=1)
    assert _same(out.batch, again.batch)  # a seed fixes the samples


@pytest.mark.parametrize("name", BY_NAME)
def test_every_domain_distils_into_students_that_sample_and_decode(fitted, name):
    run = fitted(name)
    tiny = {**TINY, "steps": 3}
    run.distill(dense=tiny, reflow=tiny, pairs=4, teacher={"strategy": "full", "solver": "euler", "steps": 2})
    for model in ("student", "dense"):
        out = run.sample(5, model=model, solver="euler", steps=2, seed=1)
        assert len(out.items) == 5 and out.router_calls_per_sample == 0
        floats = [v for k, v in out.batch.items() if v.is_floating_point() and k not in run.domain.conditions]
        assert all(torch.isfinite(v).all() for v in floats)


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize("name", [case.name for case in CASES if case.conditions])
def test_conditioned_and_guided_sampling(fitted, name, strategy):
    run = fitted(name)
    conditions = BY_NAME[name].conditions
    plain = run.sample(6, strategy=strategy, steps=2, seed=1, conditions=conditions)
    neutral = run.sample(6, strategy=strategy, steps=2, seed=1, conditions=conditions, guidance=1.0)
    guided = run.sample(6, strategy=strategy, steps=2, seed=1, conditions=conditions, guidance=3.0)
    assert len(guided.items) == 6
    assert _same(plain.batch, neutral.batch)
    assert not _same(plain.batch, guided.batch), "guidance 3 changed nothing"
    assert guided.expert_calls_per_sample > plain.expert_calls_per_sample  # the unconditional pass too


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize("name", [case.name for case in CASES if case.given])
def test_given_entries_stay_fixed(fitted, name, strategy):
    run = fitted(name)
    given = BY_NAME[name].given(run, 6)
    out = run.sample(6, strategy=strategy, steps=3, seed=2, given=given)
    assert len(out.items) == 6
    for field_name, values in run.domain.given_values(given, out.batch).items():
        fixed = Given.from_values(values)
        assert fixed.mask.any()
        assert torch.equal(out.batch[field_name][fixed.mask], fixed.values[fixed.mask].to(out.batch[field_name]))


@pytest.mark.parametrize("name", BY_NAME)
def test_evaluate_scores_samples_against_the_records(fitted, name):
    run = fitted(name)
    scores = run.evaluate(run.sample(16, strategy="full", steps=2), **BY_NAME[name].evaluate)
    assert scores and all(_finite(value) for value in scores.values()), scores


def test_every_case_loads_as_an_mlflow_model_in_a_fresh_process(fitted, tmp_path):
    from archipelago.platform import tracking

    store = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.check_tracking(store)
    requests = {}
    for case in CASES:
        run = fitted(case.name)
        parent = tracking.start_parent(store, "contract", run.config.model_dump(mode="json"), run.run_dir,
                                       run_name=case.name)
        uri = tracking.log_ensemble_model(store, parent, run.run_dir)
        requests[uri] = {"n": 3, "strategy": "top1", "steps": 2, "conditions": case.conditions}
    code = (
        "import json, sys, mlflow\n"
        "requests = json.loads(sys.argv[1])\n"
        "print(json.dumps([len(mlflow.pyfunc.load_model(u).predict(r)) for u, r in requests.items()]))"
    )
    env = {**os.environ, tracking.TRACKING_ENV: store,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(requests)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [3] * len(CASES)
