"""Graph reading, normalisation and writing (`domains/graphs/io.py`) and the seeded SPECTRE / DiGress
benchmarks (`domains/graphs/synthetic.py`): round trips through every format, the normalisation
counts, errors that name the file, and the published sizes and splits."""

from __future__ import annotations

import logging
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import torch
from torch_geometric.data import Data, InMemoryDataset

from archipelago.domains.graphs import io, synthetic, writers


def _labelled(gid: str, n: int, seed: int, edge_labels=("a", "b")) -> nx.Graph:
    """A connected canonical graph with node and edge labels and graph attributes, plus one isolated node."""
    rng = np.random.default_rng(seed)
    g = nx.Graph(id=gid, y=float(rng.random()), communities=int(rng.integers(2, 6)))
    g.add_nodes_from((v, {"label": int(rng.integers(3))}) for v in range(n + 1))
    tree = nx.random_labeled_tree(n, seed=seed)
    g.add_edges_from((u, v, {"label": edge_labels[int(rng.integers(len(edge_labels)))]}) for u, v in tree.edges())
    return g


def _same(a: nx.Graph, b: nx.Graph, node_labels: bool = True, edge_labels: bool = True) -> bool:
    """Isomorphic, with the same node and edge labels where asked."""
    node_match = (lambda x, y: x.get("label") == y.get("label")) if node_labels else None
    edge_match = (lambda x, y: x.get("label") == y.get("label")) if edge_labels else None
    return nx.is_isomorphic(a, b, node_match=node_match, edge_match=edge_match)


def _canonical(graphs: list[nx.Graph]) -> list[nx.Graph]:
    clean, counts = io.normalize(graphs)
    assert not any(counts.values()), counts
    return clean


@pytest.fixture
def graphs() -> list[nx.Graph]:
    return [_labelled(f"g{i}", 6 + i, seed=i) for i in range(3)]


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


def test_data_round_trip_keeps_structure_labels_and_properties(graphs):
    vocab = ["a", "b"]
    data = [writers.to_data(g, edge_vocab=vocab) for g in graphs]
    assert data[0].edge_index.shape[1] == 2 * graphs[0].number_of_edges()  # both directions
    assert data[0].x.dtype == torch.long and data[0].edge_attr.dtype == torch.long
    back = _canonical(io.read_graphs(data))
    for g, h in zip(graphs, back, strict=True):
        for _, _, attrs in h.edges(data=True):
            attrs["label"] = vocab[attrs["label"]]
        assert _same(g, h)
        assert h.graph == g.graph  # id, y (exactly) and communities
        assert sorted(h.nodes) == list(range(g.number_of_nodes()))


def test_data_edges_in_one_direction_or_both_read_the_same():
    one = Data(edge_index=torch.tensor([[0, 1], [1, 2]]), num_nodes=4)
    both = Data(edge_index=torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]), num_nodes=4)
    a, b = io.read_graphs([one, both])
    assert type(a) is nx.Graph and type(b) is nx.Graph
    assert sorted(a.edges) == sorted(b.edges) == [(0, 1), (1, 2)] and a.number_of_nodes() == 4


def test_data_one_hot_labels_and_continuous_features():
    one_hot = Data(edge_index=torch.tensor([[0, 1], [1, 0]]), x=torch.eye(3)[[2, 0]],
                   edge_attr=torch.tensor([[0.0, 1.0], [0.0, 1.0]]), y=torch.tensor([[4]]))
    features = Data(edge_index=torch.tensor([[0], [1]]), x=torch.randn(2, 5), y=torch.zeros(1, 0))
    a, b = io.read_graphs([one_hot, features])
    assert [a.nodes[v]["label"] for v in a] == [2, 0] and a.edges[0, 1]["label"] == 1 and a.graph["y"] == 4
    assert all("label" not in attrs for _, attrs in b.nodes(data=True)) and "y" not in b.graph
    named = Data(edge_index=torch.tensor([[0], [1]]), atom=torch.tensor([6, 8]), x=torch.randn(2, 5))
    (c,) = io.read_graphs([named], node_label="atom")
    assert [c.nodes[v]["label"] for v in c] == [6, 8]
    (d,) = io.read_graphs([Data(edge_index=torch.tensor([[0], [1]]), element=["C", "O"], num_nodes=2)],
                         node_label="element")
    assert [d.nodes[v]["label"] for v in d] == ["C", "O"]
    with pytest.raises(ValueError, match="'atom'"):
        io.read_graphs([features], node_label="atom")


class _Graphs(InMemoryDataset):
    def __init__(self, root: str, data_list: list[Data] | None = None):
        self._data_list = data_list
        super().__init__(root)
        self.load(self.processed_paths[0])

    @property
    def processed_file_names(self) -> list[str]:
        return ["graphs.pt"]

    def process(self) -> None:
        self.save(self._data_list, self.processed_paths[0])


def test_in_memory_dataset_reads_back(graphs, tmp_path):
    _Graphs(str(tmp_path), [writers.to_data(g, edge_vocab=["a", "b"]) for g in graphs])
    dataset = _Graphs(str(tmp_path))  # from the processed file
    back = _canonical(io.read_graphs(dataset))
    assert len(back) == len(graphs)
    for g, h in zip(graphs, back, strict=True):
        assert _same(g, h, edge_labels=False) and h.graph == g.graph


def test_edge_list_folder_round_trip(graphs, tmp_path):
    paths = writers.write_edge_lists(graphs, tmp_path / "lists")
    assert [p.name for p in paths] == ["g0.csv", "g1.csv", "g2.csv"]
    assert paths[0].read_text().splitlines()[0] == "source,target,label"
    back = _canonical(io.read_graphs(tmp_path / "lists"))
    assert [h.graph["id"] for h in back] == ["g0", "g1", "g2"]
    for g, h in zip(graphs, back, strict=True):
        assert _same(g, h, node_labels=False)  # edge lists have no node labels; isolated nodes come back


@pytest.mark.parametrize("name", ["edges.csv", "edges.tsv"])
def test_edge_table_round_trip(graphs, tmp_path, name):
    path = writers.write_edge_table(graphs, tmp_path / name)
    assert list(pd.read_csv(path, sep=None, engine="python").columns) == ["graph_id", "source", "target", "label"]
    back = _canonical(io.read_graphs(path))
    assert [h.graph["id"] for h in back] == ["g0", "g1", "g2"]
    for g, h in zip(graphs, back, strict=True):
        assert _same(g, h, node_labels=False)


def test_plain_whitespace_edge_lists_without_header(tmp_path):
    (tmp_path / "b.txt").write_text("# a comment\n10 20 1\n20 30 2\n")
    (tmp_path / "a.edgelist").write_text("1 2\n2 3\n3 1\n")
    (tmp_path / "notes.md").write_text("not a graph")
    a, b = _canonical(io.read_graphs(tmp_path))
    assert (a.graph["id"], b.graph["id"]) == ("a", "b")
    assert nx.is_isomorphic(a, nx.cycle_graph(3))
    assert sorted(b.edges(data="label")) == [(0, 1, 1), (1, 2, 2)]  # 10, 20, 30 relabelled in sorted order


def test_networkx_input_is_copied_not_changed():
    g = nx.Graph(id="named", partition=[{0, 1}])
    g.add_node("b", kind="x", pos=(0, 1))
    g.add_node("a", kind="y")
    g.add_edge("a", "b", bond=2, weight=0.5)
    before = nx.to_dict_of_dicts(g), dict(g.nodes(data=True)), dict(g.graph)
    (read,) = io.read_graphs([g], node_label="kind", edge_label="bond")
    (h,), _ = io.normalize([read])
    assert (nx.to_dict_of_dicts(g), dict(g.nodes(data=True)), dict(g.graph)) == before
    assert dict(h.nodes(data=True)) == {0: {"label": "y"}, 1: {"label": "x"}}  # "a" < "b"
    assert dict(h.edges[0, 1]) == {"label": 2} and h.graph == {"id": "named"}
    assert io.read_graphs([nx.path_graph(2)])[0].graph["id"] == "0"  # the index names an unnamed graph


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


def test_normalize_counts_each_change_and_leaves_simple_undirected_graphs(caplog):
    loop = nx.Graph([(0, 1), (1, 1)], id="loop")
    directed = nx.DiGraph([(0, 1), (1, 0), (1, 2)], id="directed")
    multi = nx.MultiGraph([(0, 1), (0, 1), (1, 2)], id="multi")
    empty = nx.Graph(id="empty")
    large = nx.path_graph(9)
    large.graph["id"] = "large"
    ok = nx.Graph([("x", "y")])
    with caplog.at_level(logging.WARNING, logger=io.__name__):
        clean, counts = io.normalize([loop, directed, multi, empty, large, ok], max_nodes=8)
    assert counts == {"self_loops_removed": 1, "directed_graphs_symmetrised": 1, "multi_edges_merged": 1,
                      "empty_dropped": 1, "too_large_dropped": 1}
    assert [g.graph["id"] for g in clean] == ["loop", "directed", "multi", "5"]
    for g in clean:
        assert type(g) is nx.Graph and nx.number_of_selfloops(g) == 0
        assert sorted(g.nodes) == list(range(g.number_of_nodes()))
    assert [g.number_of_edges() for g in clean] == [1, 2, 2, 1]
    (record,) = [r for r in caplog.records if r.name == io.__name__]
    assert all(gid in record.getMessage() for gid in ("loop", "directed", "multi", "empty", "large"))
    assert loop.has_edge(1, 1) and directed.is_directed()  # the inputs are untouched


def test_normalize_reports_zero_counts_and_logs_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger=io.__name__):
        clean, counts = io.normalize([nx.path_graph(3)])
    assert counts == dict.fromkeys(io.COUNTS, 0) and len(clean) == 1 and not caplog.records


def test_repeated_edges_in_files_and_data_are_counted(tmp_path):
    (tmp_path / "g.txt").write_text("0 1\n1 0\n0 1\n1 2\n")  # 0-1 twice in one direction: one merge
    data = Data(edge_index=torch.tensor([[0, 1, 2], [1, 0, 2]]), num_nodes=3)  # and a self-loop
    _, counts = io.normalize(io.read_graphs(tmp_path) + io.read_graphs([data]))
    assert counts["multi_edges_merged"] == 1 and counts["self_loops_removed"] == 1


# --------------------------------------------------------------------------------------------------
# Errors name the file
# --------------------------------------------------------------------------------------------------


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="nowhere.csv: no such file"):
        io.read_graphs(tmp_path / "nowhere.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no edge-list files"):
        io.read_graphs(tmp_path / "empty")


@pytest.mark.parametrize("text,match", [
    ("0 1\n1 x\n", "row 2 of column 'target'"),
    ("0 1 2 3\n", "4 columns"),
    ("0 1\n1 2 3 4\n", "cannot parse"),
    ("from to\n0 1\n", "no column 'source'"),
])
def test_malformed_edge_list_names_the_file(tmp_path, text, match):
    (tmp_path / "good.txt").write_text("0 1\n")
    (tmp_path / "bad.txt").write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        io.read_graphs(tmp_path)
    assert "bad.txt" in str(error.value)


def test_table_without_graph_id_names_the_file_and_column(tmp_path):
    path = tmp_path / "edges.csv"
    path.write_text("source,target\n0,1\n")
    with pytest.raises(ValueError, match=r"edges.csv: no column 'graph_id'"):
        io.read_graphs(path)
    path.write_text("graph_id,source,target\ng,0,1\n")
    with pytest.raises(ValueError, match=r"edges.csv: no column 'kind'"):
        io.read_graphs(path, edge_label="kind")


def test_writers_refuse_non_canonical_graphs_and_leave_no_partial_file(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="normalize it first"):
        writers.to_data(nx.Graph([("a", "b")], id="strings"))
    with pytest.raises(ValueError, match="name more than one graph"):
        writers.write_edge_lists([nx.path_graph(2), nx.path_graph(3)], tmp_path / "same")  # both ids "?"

    def fail(frame, path, **kwargs):
        Path(path).write_text("source,tar")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail)
    with pytest.raises(OSError, match="disk full"):
        writers.write_edge_table([nx.path_graph(3)], tmp_path / "table.csv")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# The synthetic benchmarks
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmarks() -> dict[str, dict[str, list[nx.Graph]]]:
    return {name: synthetic.benchmark(name, seed=0) for name in synthetic.BENCHMARKS}


@pytest.mark.parametrize("name,sizes", [("community-small", (64, 16, 20)), ("planar", (128, 32, 40)),
                                        ("sbm", (128, 32, 40))])
def test_published_split_sizes(benchmarks, name, sizes):
    splits = benchmarks[name]
    assert tuple(len(splits[part]) for part in synthetic.SPLITS) == sizes
    ids = [g.graph["id"] for part in splits.values() for g in part]
    assert len(set(ids)) == sum(sizes) and all(i.startswith(f"{name}-") for i in ids)
    for part in splits.values():  # each split keeps the generation order
        order = [int(g.graph["id"].rsplit("-", 1)[1]) for g in part]
        assert order == sorted(order)


def test_community_small(benchmarks):
    graphs = [g for part in benchmarks["community-small"].values() for g in part]
    for g in graphs:
        n = g.number_of_nodes()
        assert 12 <= n <= 20 and n % 2 == 0 and nx.is_connected(g)
        half = n // 2
        cross = sum((u < half) != (v < half) for u, v in g.edges())
        inside = g.number_of_edges() - cross
        assert cross >= 1 and inside > 5 * cross  # two dense communities joined by a few edges
    assert {g.number_of_nodes() for g in graphs} == {12, 14, 16, 18, 20}


def test_planar(benchmarks):
    for g in (g for part in benchmarks["planar"].values() for g in part):
        assert g.number_of_nodes() == 64 and nx.is_connected(g) and nx.check_planarity(g)[0]


def test_sbm(benchmarks):
    graphs = [g for part in benchmarks["sbm"].values() for g in part]
    for g in graphs:
        k = g.graph["communities"]
        assert isinstance(k, int) and 2 <= k <= 5 and 20 * k <= g.number_of_nodes() <= 40 * k
        assert set(g.graph) == {"id", "communities"}
        assert all(not attrs for _, attrs in g.nodes(data=True))  # no "block" from networkx
    assert {g.graph["communities"] for g in graphs} == {2, 3, 4, 5}


def test_generated_graphs_are_canonical(benchmarks):
    graphs = [g for splits in benchmarks.values() for part in splits.values() for g in part]
    clean, counts = io.normalize(graphs)
    assert not any(counts.values())
    assert all(list(a.edges) == list(b.edges) for a, b in zip(graphs, clean, strict=True))


def _fingerprint(splits: dict[str, list[nx.Graph]]) -> list:
    return [(part, g.graph["id"], sorted(g.edges)) for part, graphs in splits.items() for g in graphs]


def test_same_seed_same_benchmark_other_seed_other_benchmark(benchmarks):
    assert _fingerprint(synthetic.benchmark("community-small", seed=0)) == _fingerprint(benchmarks["community-small"])
    assert _fingerprint(synthetic.benchmark("community-small", seed=1)) != _fingerprint(benchmarks["community-small"])


@pytest.mark.parametrize("generate", [synthetic.planar, synthetic.sbm])
def test_same_seed_same_graphs_other_seed_other_graphs(generate):
    assert _fingerprint({"all": generate(3, seed=5)}) == _fingerprint({"all": generate(3, seed=5)})
    assert _fingerprint({"all": generate(3, seed=5)}) != _fingerprint({"all": generate(3, seed=6)})
    assert [g.graph for g in generate(3, seed=5)] == [g.graph for g in generate(3, seed=5)]


def test_split_seed():
    graphs = synthetic.planar(20, nodes=8)
    assert _fingerprint(synthetic.split(graphs, "planar", seed=0)) != _fingerprint(
        synthetic.split(graphs, "planar", seed=1))
    assert synthetic.split_sizes(100) == (64, 16, 20) and synthetic.split_sizes(200) == (128, 32, 40)


def test_unknown_benchmark_names_the_choices():
    with pytest.raises(ValueError, match=r"'grid'.*community-small.*planar.*sbm"):
        synthetic.benchmark("grid")
