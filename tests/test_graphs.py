"""The graph domain: a small fit that samples and scores every metric, the layout of generated graphs,
structural features with known answers, conditions, records, and bad input."""

from __future__ import annotations

import json
import logging

import networkx as nx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from archipelago.domains.graphs import data, synthetic
from archipelago.domains.graphs.domain import GraphDomain
from archipelago.domains.graphs.networks import cycle_features, spectral_features
from archipelago.experts.conditions import Condition
from archipelago.platform import sdk

TINY = {"steps": 20, "batch_size": 8, "warmup_steps": 2, "progress": False}
SMALL_NET = {"width": 16, "edge_width": 4, "depth": 1, "heads": 2, "router_width": 8, "router_depth": 1}


@pytest.fixture(scope="module")
def community_run(tmp_path_factory) -> sdk.Run:
    """Two tiny experts and a router on a few community-small graphs."""
    domain = GraphDomain(max_nodes=20, require_connected=True, **SMALL_NET)
    graphs = synthetic.benchmark("community-small")["train"][:24]
    return sdk.fit(graphs, str(tmp_path_factory.mktemp("graphs") / "run"), domain=domain, experts=2,
                   expert=TINY, router=TINY)


def test_a_small_fit_samples_and_computes_every_metric(community_run):
    out = community_run.sample(8, strategy="top1", solver="euler", steps=10, seed=0)
    assert len(out.items) == 8 and all(isinstance(g, nx.Graph) for g in out.items)
    scores = community_run.evaluate(out, real="community-small:test", train="community-small:train",
                                    validity="planar")
    expected = {"degree", "clustering", "orbit", "spectral", "unique", "novel", "valid", "vun"}
    assert expected | {f"reference_{m}" for m in ("degree", "clustering", "orbit", "spectral")} <= set(scores)
    assert all(np.isfinite(value) for value in scores.values()), scores
    assert 0 <= scores["vun"] <= scores["valid"] <= 1


def test_generated_graphs_are_simple_and_sized_by_their_expert(community_run):
    out = community_run.sample(12, strategy="sample", solver="euler", steps=6, seed=3)
    batch, statistics = out.batch, community_run.ensemble.statistics
    i, j = batch["pair_index"].unbind(1)
    assert (i < j).all(), "a pair joins a node to itself or is stored twice"
    owner = batch["pair_batch"]
    assert (batch["node_batch"][i] == owner).all() and (batch["node_batch"][j] == owner).all()
    for g, graph in enumerate(out.items):
        n = graph.number_of_nodes()
        assert graph.number_of_edges() == int(((batch["pair_batch"] == g) & (batch["edge_type"] == 1)).sum())
        assert nx.number_of_selfloops(graph) == 0
        assert statistics[int(out.assignment[g])]["nodes"][n] > 0, "a size its expert never saw"
        pairs = batch["pair_index"][batch["pair_batch"] == g]
        assert len({tuple(p) for p in pairs.tolist()}) == n * (n - 1) // 2  # every pair once: symmetric


def test_generated_graphs_decode_to_data_and_records(community_run):
    out = community_run.sample(4, strategy="full", solver="euler", steps=4, seed=5)
    graphs = community_run.domain.decode_data(out.batch)
    assert [d.num_nodes for d in graphs] == [g.number_of_nodes() for g in out.items]
    assert [d.edge_index.shape[1] for d in graphs] == [2 * g.number_of_edges() for g in out.items]
    back = data.table_to_graphs(community_run.domain.sample_records(out.batch))
    assert all(nx.utils.graphs_equal(a, b) for a, b in zip(out.items, back, strict=True))


def test_cycle_features_count_triangles_and_squares():
    k4 = torch.tensor(nx.to_numpy_array(nx.complete_graph(4)), dtype=torch.float32)[None]
    c4 = torch.tensor(nx.to_numpy_array(nx.cycle_graph(4)), dtype=torch.float32)[None]
    node, graph = cycle_features(torch.cat([k4, c4]))
    assert torch.equal(node[0], torch.full((4, 2), 3.0))  # K4: 3 triangles, 3 squares at every node
    assert torch.equal(graph[0], torch.tensor([4.0, 3.0]))
    assert torch.equal(node[1], torch.tensor([[0.0, 1.0]] * 4)) and torch.equal(graph[1], torch.tensor([0.0, 1.0]))


def test_spectral_features_count_components_and_ignore_padding():
    two_triangles = nx.disjoint_union(nx.complete_graph(3), nx.complete_graph(3))
    adjacency = torch.zeros(1, 8, 8)
    adjacency[0, :6, :6] = torch.tensor(nx.to_numpy_array(two_triangles))
    mask = torch.tensor([[True] * 6 + [False] * 2])
    node, graph = spectral_features(adjacency, mask)
    assert graph[0, 0] == 2  # components; the two padding nodes are not counted
    assert torch.allclose(graph[0, 1:5], torch.tensor([3.0, 3.0, 3.0, 3.0]))  # K3's Laplacian: 0, 3, 3
    assert node[0, 6:].abs().sum() == 0
    assert node[0, :6, -1].sum() == 3  # the largest component flag marks one triangle


def test_sbm_communities_are_a_categorical_condition_named_by_number():
    domain = GraphDomain(max_nodes=187, conditions=["communities"])
    table = domain.ingest("sbm:val")
    assert domain.conditions["communities"].classes == ("2", "3", "4", "5")
    assert Condition("communities", classes=("2", "3", "4", "5")).encode(3) == 1  # 3 communities, not index 3
    samples = domain.samples(table)
    assert samples.batch(torch.arange(3))["communities"].tolist() == [
        int(v) - 2 for v in table.column("communities").to_pylist()[:3]]


def test_records_round_trip_through_parquet(tmp_path):
    graphs = synthetic.benchmark("community-small")["test"][:5]
    for g in graphs:
        nx.set_edge_attributes(g, "single", "label")
    path = tmp_path / "graphs.parquet"
    data.write_parquet(graphs, path)
    domain = GraphDomain(max_nodes=20)
    table = domain.ingest(str(path))
    assert domain.config.edge_labels == ["single"]
    back = data.table_to_graphs(table)
    assert all(nx.utils.graphs_equal(a, b) for a, b in zip(graphs, back, strict=True))


def test_inputs_are_normalised_and_counted(caplog):
    messy = nx.MultiDiGraph(id="messy")
    messy.add_edges_from([(0, 1), (1, 0), (1, 2), (1, 2), (2, 2)])
    with caplog.at_level(logging.WARNING):
        table = GraphDomain(max_nodes=8, max_dropped=0.5).ingest([messy, nx.path_graph(3), nx.Graph()])
    assert table.num_rows == 2  # the empty graph is dropped
    assert table.column("src").to_pylist()[0] == [0, 1] and table.column("dst").to_pylist()[0] == [1, 2]
    assert "messy" in caplog.text


@pytest.mark.parametrize(("graphs", "settings", "message"), [
    ([nx.path_graph(4), nx.disjoint_union(nx.path_graph(2), nx.path_graph(2))], {"require_connected": True},
     "disconnected"),
    ([nx.path_graph(4), nx.path_graph(30)], {"max_nodes": 20}, "over max_nodes"),
    ([nx.Graph(), nx.Graph()], {}, "empty"),
    ([], {}, "no graphs"),
    ([nx.Graph([(0, 1, {"label": "x"}), (1, 2)])], {}, "label all or none"),
])
def test_bad_graphs_are_named(graphs, settings, message):
    with pytest.raises(ValueError, match=message):
        GraphDomain(**settings).ingest(graphs)


def test_labels_outside_the_vocabulary_are_refused():
    domain = GraphDomain()
    domain.ingest([nx.Graph([(0, 1, {"label": "single"}), (1, 2, {"label": "double"})])])
    with pytest.raises(ValueError, match="edge label 'triple' is not in the run's vocabulary"):
        domain.ingest([nx.Graph([(0, 1, {"label": "triple"})])], fit=False)


@pytest.mark.parametrize(("source", "message"), [
    ("planar:holdout", "unknown split"),
    ("no/such/graphs", "neither a file or folder nor a benchmark"),
])
def test_bad_sources_are_named(source, message):
    with pytest.raises(ValueError, match=message):
        GraphDomain().ingest(source)


def test_unknown_evaluate_options_are_refused(community_run):
    out = community_run.sample(2, strategy="full", solver="euler", steps=2)
    with pytest.raises(ValueError, match="unknown evaluate options"):
        community_run.evaluate(out, kernal="tv")


def test_the_command_line_fits_samples_records_and_scores_them(tmp_path, capsys):
    from archipelago.platform.cli import main

    settings = {"run_dir": str(tmp_path / "run"), "domain": "graphs", "data": "community-small:val", "experts": 2,
                "domain_config": {"max_nodes": 20, **SMALL_NET}, "expert": TINY, "router": TINY}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    assert main(["fit", str(tmp_path / "run.yaml"), "--in-process", "--no-tracking"]) == 0
    out = tmp_path / "graphs.parquet"
    assert main(["sample", "--run-dir", str(tmp_path / "run"), "-n", "5", "--steps", "4", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 5
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(tmp_path / "run"), "--samples", str(out),
                 "--real", "community-small:test", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"degree", "clustering", "orbit", "spectral", "coverage_tv"} <= set(scores)
