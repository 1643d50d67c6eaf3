"""Graph records: canonical networkx graphs as Arrow rows and back, the pair level, and graph features.

A record is one graph: `graph_id` (string), `num_nodes`, its edges as `src` < `dst` lists, optional
`node_label` and `edge_label` lists of label names (strings), and one column per graph-level
condition (a string for a categorical condition, a float for a continuous one). This is also the
Parquet format the domain reads and writes, so a table written by `write_parquet` reads back as is.

The diffused pair level holds every unordered node pair {i < j} of a graph in row-major order of
the upper triangle, `pair_position` gives a pair's row, and an edge category per pair: 0 for no
edge, 1 + label for an edge (1 for an unlabelled edge).

Partition features are graph statistics (as issue 8 asks: size, degree and clustering histograms,
spectrum): the number of nodes, density, degree mean and spread, mean clustering, transitivity,
components, a 10-bin degree histogram and a 10-bin histogram of the normalised-Laplacian spectrum.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import networkx as nx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BASE_COLUMNS = ("graph_id", "num_nodes", "src", "dst")
DEGREE_BINS = 10
SPECTRUM_BINS = 10


def pair_rows(n: int) -> np.ndarray:
    """The unordered node pairs {i < j} of an n-node graph in pair-level order, [n (n - 1) / 2, 2]."""
    i, j = np.triu_indices(n, k=1)
    return np.stack([i, j], 1)


def pair_position(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """The pair-level row of pairs (i, j), i < j, of an n-node graph."""
    return i * n - i * (i + 1) // 2 + (j - i - 1)


def edge_categories(num_nodes: int, src: Sequence[int], dst: Sequence[int], labels: Sequence[int] | None) -> np.ndarray:
    """Every pair's category [n (n - 1) / 2]: 0 for no edge, 1 + label code for an edge."""
    out = np.zeros(num_nodes * (num_nodes - 1) // 2, dtype=np.int64)
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    codes = np.ones(len(src), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64) + 1
    out[pair_position(src, dst, num_nodes)] = codes
    return out


def condition_value(value: object, classes: Sequence[str] | None) -> object:
    """A graph attribute as its record value: the class name for a categorical condition, a float otherwise."""
    if value is None:
        return None
    return str(value) if classes is not None else float(value)


def to_record(g: nx.Graph, conditions: Mapping[str, Sequence[str] | None], node_labels: bool,
              edge_labels: bool) -> dict:
    """A canonical graph (nodes 0..n-1) as a record; labels as strings."""
    edges = sorted((min(u, v), max(u, v)) for u, v in g.edges())
    record = {"graph_id": str(g.graph.get("id", "")), "num_nodes": g.number_of_nodes(),
              "src": [u for u, _ in edges], "dst": [v for _, v in edges]}
    if node_labels:
        record["node_label"] = [str(g.nodes[i]["label"]) for i in range(g.number_of_nodes())]
    if edge_labels:
        record["edge_label"] = [str(g.edges[u, v]["label"]) for u, v in edges]
    for name, classes in conditions.items():
        record[name] = condition_value(g.graph.get(name), classes)
    return record


def schema(conditions: Mapping[str, Sequence[str] | None], node_labels: bool, edge_labels: bool) -> pa.Schema:
    fields = [pa.field("graph_id", pa.string()), pa.field("num_nodes", pa.int32()),
              pa.field("src", pa.list_(pa.int32())), pa.field("dst", pa.list_(pa.int32()))]
    if node_labels:
        fields.append(pa.field("node_label", pa.list_(pa.string())))
    if edge_labels:
        fields.append(pa.field("edge_label", pa.list_(pa.string())))
    for name, classes in sorted(conditions.items()):
        fields.append(pa.field(name, pa.string() if classes is not None else pa.float64()))
    return pa.schema(fields)


def graphs_to_table(graphs: Sequence[nx.Graph], conditions: Mapping[str, Sequence[str] | None] | None = None,
                    node_labels: bool = False, edge_labels: bool = False) -> pa.Table:
    """Canonical graphs as a records table (see the module docstring)."""
    conditions = dict(conditions or {})
    rows = [to_record(g, conditions, node_labels, edge_labels) for g in graphs]
    return pa.Table.from_pylist(rows, schema=schema(conditions, node_labels, edge_labels))


def table_to_graphs(table: pa.Table) -> list[nx.Graph]:
    """Records back as canonical graphs: node and edge `label` attributes, conditions in `g.graph`."""
    extra = [name for name in table.column_names if name not in (*BASE_COLUMNS, "node_label", "edge_label")]
    graphs = []
    for row in table.to_pylist():
        g = nx.Graph(id=row["graph_id"], **{name: row[name] for name in extra if row[name] is not None})
        g.add_nodes_from(range(row["num_nodes"]))
        if row.get("node_label") is not None:
            nx.set_node_attributes(g, dict(enumerate(row["node_label"])), "label")
        labels = row.get("edge_label")
        for e, (u, v) in enumerate(zip(row["src"], row["dst"], strict=True)):
            g.add_edge(u, v, **({"label": labels[e]} if labels is not None else {}))
        graphs.append(g)
    return graphs


def read_parquet(path: str | Path) -> pa.Table:
    """A records table written by `write_parquet` (or by hand in the same format)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from error
    missing = [name for name in BASE_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: graph records need the columns {list(BASE_COLUMNS)}; missing {missing}")
    return table


def write_parquet(graphs: Sequence[nx.Graph], path: str | Path,
                  conditions: Mapping[str, Sequence[str] | None] | None = None) -> None:
    """Graphs as a Parquet records table, through a temporary file renamed into place."""
    node_labels = any("label" in data for g in graphs for _, data in g.nodes(data=True))
    edge_labels = any("label" in data for g in graphs for _, _, data in g.edges(data=True))
    table = graphs_to_table(graphs, conditions, node_labels, edge_labels)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def graph_features(g: nx.Graph) -> np.ndarray:
    """The partition features of one graph (see the module docstring)."""
    n = g.number_of_nodes()
    degrees = np.array([d for _, d in g.degree()], dtype=float) if n else np.zeros(1)
    density = nx.density(g) if n > 1 else 0.0
    degree_hist = np.bincount(np.minimum(degrees.astype(int), DEGREE_BINS - 1), minlength=DEGREE_BINS) / max(n, 1)
    if n > 1:
        spectrum = np.linalg.eigvalsh(nx.normalized_laplacian_matrix(g, nodelist=range(n)).toarray())
    else:
        spectrum = np.zeros(1)
    spectrum_hist = np.histogram(spectrum, bins=SPECTRUM_BINS, range=(-1e-5, 2.0))[0] / len(spectrum)
    summary = [n, density, degrees.mean(), degrees.std(), nx.average_clustering(g) if n else 0.0,
               nx.transitivity(g), math.log1p(nx.number_connected_components(g)) if n else 0.0]
    return np.concatenate([summary, degree_hist, spectrum_hist])
