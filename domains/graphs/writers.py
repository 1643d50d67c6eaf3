"""Writing graphs: canonical networkx graphs as torch-geometric `Data`, edge-list folders and edge tables.

The file formats are those `archipelago.domains.graphs.io.read_graphs` reads (see its docstring);
every file is written to a temporary name and renamed into place, so a failure leaves no half-written
file, and every graph is checked before anything is written.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import networkx as nx
import pandas as pd
import torch
from torch_geometric.data import Data
from torch_geometric.utils import to_undirected

from archipelago.domains.graphs.io import LABEL, TABLE_SUFFIXES, is_scalar, plain

logger = logging.getLogger(__name__)


def to_data(g: nx.Graph, node_vocab: Sequence | None = None, edge_vocab: Sequence | None = None) -> Data:
    """A canonical graph as a `Data` object: `edge_index` in both directions, `num_nodes`, node labels
    in `x` and edge labels in `edge_attr` as LongTensor codes (indices into the vocabulary, or the
    labels themselves when they are non-negative ints and no vocabulary is given), `y` from
    `g.graph["y"]`, the id and the other scalar graph attributes as attributes of their own."""
    gid = _check_canonical(g)
    n = g.number_of_nodes()
    edges = sorted((min(u, v), max(u, v)) for u, v in g.edges())
    edge_index = torch.tensor(edges, dtype=torch.long).t().reshape(2, -1)
    data = Data(num_nodes=n, id=gid)
    node_labels = [g.nodes[v].get(LABEL) for v in range(n)]
    if any(label is not None for label in node_labels):
        data.x = _codes(node_labels, node_vocab, gid, "node")
    edge_labels = [g.edges[e].get(LABEL) for e in edges]
    if any(label is not None for label in edge_labels):
        data.edge_index, data.edge_attr = to_undirected(edge_index, _codes(edge_labels, edge_vocab, gid, "edge"),
                                                        num_nodes=n)
    else:
        data.edge_index = to_undirected(edge_index, num_nodes=n)
    for key, value in g.graph.items():
        if key != "id" and is_scalar(value):
            value = plain(value)
            # y as a tensor, as torch-geometric keeps targets; float64 so that it reads back exactly
            data[key] = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else None) \
                if key == "y" else value
    return data


def _codes(labels: Sequence, vocab: Sequence | None, gid: str, kind: str) -> torch.Tensor:
    if any(label is None for label in labels):
        raise ValueError(f"graph {gid!r}: some {kind}s have a label and some do not")
    if vocab is None:
        if not all(isinstance(label, int) and label >= 0 for label in labels):
            raise ValueError(f"graph {gid!r}: {kind} labels {sorted(set(map(str, labels)))[:5]} are not non-negative "
                             f"ints; pass {kind}_vocab to code them")
        return torch.tensor(labels, dtype=torch.long)
    code = {label: i for i, label in enumerate(vocab)}
    missing = [label for label in labels if label not in code]
    if missing:
        raise ValueError(f"graph {gid!r}: {kind} label {missing[0]!r} is not in the vocabulary {list(vocab)}")
    return torch.tensor([code[label] for label in labels], dtype=torch.long)


def write_edge_lists(graphs: Sequence[nx.Graph], folder: str | os.PathLike) -> list[Path]:
    """One CSV file per canonical graph, `<id>.csv` (unsafe characters of the id as "_"), with a header
    `source,target[,label]`; returns the paths. Every graph is checked before any file is written."""
    folder = Path(folder)
    names = [_file_stem(_check_canonical(g)) for g in graphs]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"graph ids {repeated[:5]} name more than one graph; ids name the files")
    frames = [_edge_frame(g) for g in graphs]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, frame in zip(names, frames, strict=True):
        paths.append(folder / f"{name}.csv")
        _write_atomically(frame, paths[-1], ",")
    return paths


def write_edge_table(graphs: Sequence[nx.Graph], path: str | os.PathLike) -> Path:
    """All canonical graphs in one .csv or .tsv file with columns `graph_id, source, target[, label]`.
    A graph with no nodes has no row, so it does not come back."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: an edge table is a .csv or .tsv file")
    ids = [_check_canonical(g) for g in graphs]
    repeated = sorted(gid for gid, count in Counter(ids).items() if count > 1)
    if repeated:
        raise ValueError(f"graph ids {repeated[:5]} name more than one graph; an edge table tells graphs apart by id")
    frames = [_edge_frame(g).assign(graph_id=gid) for gid, g in zip(ids, graphs, strict=True)]
    columns = ["graph_id", "source", "target"] + ([LABEL] if any(LABEL in f.columns for f in frames) else [])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(table.reindex(columns=columns), path, "\t" if path.suffix.lower() == ".tsv" else ",")
    return path


def _check_canonical(g: nx.Graph) -> str:
    gid = str(g.graph.get("id", "?"))
    if g.is_directed() or g.is_multigraph() or set(g.nodes) != set(range(g.number_of_nodes())):
        raise ValueError(f"graph {gid!r} is not canonical (an undirected simple graph on nodes 0..n-1): "
                         "normalize it first")
    if nx.number_of_selfloops(g):
        raise ValueError(f"graph {gid!r} has self-loops: normalize it first")
    return gid


def _edge_frame(g: nx.Graph) -> pd.DataFrame:
    """Rows `source, target[, label]` of a canonical graph, an isolated node as a row without a target."""
    edges = sorted((min(u, v), max(u, v)) for u, v in g.edges())
    isolated = sorted(v for v in g.nodes if g.degree(v) == 0)
    frame = pd.DataFrame({"source": [u for u, _ in edges] + isolated,
                          "target": pd.array([v for _, v in edges] + [None] * len(isolated), dtype="Int64")})
    labels = [g.edges[e].get(LABEL) for e in edges]
    if any(label is not None for label in labels):
        frame[LABEL] = pd.Series(labels + [None] * len(isolated), dtype=object)  # ints stay ints, not 1.0
    if any(LABEL in attrs for _, attrs in g.nodes(data=True)):
        logger.warning("graph %r: node labels are not written (edge lists have no place for them)",
                       g.graph.get("id"))
    return frame


def _file_stem(gid: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", gid)
    return "_" + stem[1:] if stem.startswith(".") else stem or "_"


def _write_atomically(frame: pd.DataFrame, path: Path, sep: str) -> None:
    """Write to a hidden temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        frame.to_csv(tmp, sep=sep, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
