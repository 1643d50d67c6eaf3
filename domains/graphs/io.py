"""Reading graphs: networkx graphs, torch-geometric `Data`, edge-list folders and edge tables.

Everything is read into, and written from, networkx graphs. `read_graphs` keeps what it reads
(self-loops, directions, repeated edges) so that `normalize` can count what it changes; the two
together give the canonical form the graph domain works on:

- an undirected simple `nx.Graph` with nodes 0..n-1 (relabelled sorted when the old ids sort,
  else in insertion order) and edges inserted in sorted order;
- an optional categorical node attribute "label" and edge attribute "label" (a str or an int);
- scalar graph-level attributes in `g.graph` (a property such as `communities`, `y`), and
  `g.graph["id"]`, a string naming the graph in messages (file stem, table id or list index).

File formats (written by `archipelago.domains.graphs.writers`, read by `read_graphs`):

- edge-list folder: one file per graph (*.txt, *.edgelist: whitespace separated, "#" comments;
  *.csv, *.tsv), columns `source target [label]` with integer node ids, an optional header row
  (with a header, the columns are found by name); the graph id is the file stem;
- edge table: one .csv/.tsv file with columns `graph_id, source, target[, label]`, one graph per id.

A row with a source and no target declares an isolated node, so graphs with isolated nodes round
trip; node labels have no place in either format and are not written.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import torch
from torch_geometric.data import Dataset
from torch_geometric.data.data import BaseData

logger = logging.getLogger(__name__)

LABEL = "label"
COUNTS = ("self_loops_removed", "directed_graphs_symmetrised", "multi_edges_merged", "empty_dropped",
          "too_large_dropped")
EDGE_LIST_SUFFIXES = (".txt", ".edgelist", ".csv", ".tsv")
TABLE_SUFFIXES = (".csv", ".tsv")
TABLE_COLUMNS = ("graph_id", "source", "target")
# Data attributes that are structure, not graph properties (n_nodes is DiGress's copy of num_nodes).
_DATA_STRUCTURE = {"x", "edge_index", "edge_attr", "y", "pos", "batch", "ptr", "num_nodes", "n_nodes", "id"}
_INTEGER = re.compile(r"[+-]?\d+")
_SHOWN_IDS = 5


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_graphs(source: Any, node_label: str | None = None, edge_label: str | None = None) -> list[nx.Graph]:
    """Read graphs from networkx graphs, torch-geometric data or files, before `normalize`.

    `source` is a list or tuple of networkx graphs (copied: node and edge labels and graph
    attributes are kept, other node and edge attributes are not), a list of `Data` objects or a
    torch-geometric dataset, a folder of edge-list files, or one edge table (.csv/.tsv). Labels are
    read from the attribute (networkx, `Data`) or column (files) `node_label` / `edge_label`; by
    default "label" for networkx and files, `x` and `edge_attr` for `Data` when they are categorical
    (one-hot rows or integers). A missing path, an empty folder, a file that does not parse or a
    missing column is a ValueError naming the file (and the column).
    """
    if isinstance(source, (str, os.PathLike)):
        if node_label is not None:
            raise ValueError(f"{source}: edge lists and edge tables carry no node labels (node_label={node_label!r})")
        return _read_path(Path(source), edge_label)
    if isinstance(source, (nx.Graph, BaseData)):
        raise TypeError(f"read_graphs takes a list of graphs, not one {type(source).__name__}: wrap it in a list")
    if not isinstance(source, (list, tuple, Dataset)):
        raise TypeError(f"cannot read graphs from {type(source).__name__}: pass a list of networkx graphs or Data "
                        "objects, a torch-geometric dataset, or a path")
    items = list(source)
    if not items:
        raise ValueError("no graphs to read: the list or dataset is empty")
    if all(isinstance(g, nx.Graph) for g in items):
        return _from_networkx_list(items, node_label, edge_label)
    if all(isinstance(d, BaseData) for d in items):
        return _from_data_list(items, node_label, edge_label)
    kinds = sorted({type(item).__name__ for item in items})
    raise TypeError(f"expected networkx graphs or torch-geometric Data objects, got a mix of {kinds}")


def _from_networkx_list(graphs: Sequence[nx.Graph], node_label: str | None, edge_label: str | None) -> list[nx.Graph]:
    out = [_from_networkx(g, i, node_label or LABEL, edge_label or LABEL) for i, g in enumerate(graphs)]
    for kind, key, items in (("node", node_label, lambda g: g.nodes(data=True)),
                             ("edge", edge_label, lambda g: g.edges(data=True))):
        if key is not None and not any(key in item[-1] for g in graphs for item in items(g)):
            raise ValueError(f"no {kind} of any graph has the attribute {key!r} named by {kind}_label")
    return out


def _from_networkx(g: nx.Graph, index: int, node_key: str, edge_key: str) -> nx.Graph:
    """A copy of the same class (directions and repeated edges stay for `normalize` to count) with labels only."""
    out = g.__class__()
    out.graph.update(g.graph)
    out.graph["id"] = str(g.graph.get("id", index))
    for v, attrs in g.nodes(data=True):
        out.add_node(v, **_label_of(attrs, node_key))
    for u, v, attrs in g.edges(data=True):
        out.add_edge(u, v, **_label_of(attrs, edge_key))
    return out


def _label_of(attrs: dict, key: str) -> dict:
    value = attrs.get(key)
    return {} if value is None else {LABEL: plain(value)}


def _from_data_list(items: Sequence[BaseData], node_label: str | None, edge_label: str | None) -> list[nx.Graph]:
    ignored: set[str] = set()
    graphs = [_from_data(d, i, node_label, edge_label, ignored) for i, d in enumerate(items)]
    if ignored:
        logger.warning("torch-geometric data: not read: %s", "; ".join(
            "y (not a scalar)" if key == "y" else f"{key} as labels (neither one-hot rows nor integers)"
            for key in sorted(ignored)))
    return graphs


def _from_data(data: BaseData, index: int, node_label: str | None, edge_label: str | None,
               ignored: set[str]) -> nx.Graph:
    gid = str(data["id"]) if "id" in data and isinstance(data["id"], str) else str(index)
    if data.num_nodes is None:
        raise ValueError(f"graph {gid}: the Data object has no num_nodes, x or edge_index to count nodes by")
    n = int(data.num_nodes)
    edge_index = data.edge_index if "edge_index" in data and data.edge_index is not None else torch.zeros(2, 0)
    edge_index = torch.as_tensor(edge_index).long()
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"graph {gid}: edge_index has shape {tuple(edge_index.shape)}, expected [2, E]")
    if edge_index.numel() and (edge_index.min() < 0 or edge_index.max() >= n):
        raise ValueError(f"graph {gid}: edge_index has node ids outside 0..{n - 1} (num_nodes = {n})")
    nodes = _data_labels(data, node_label or "x", n, gid, node_label is not None, ignored)
    edges = _data_labels(data, edge_label or "edge_attr", edge_index.shape[1], gid, edge_label is not None, ignored)
    pairs = [(int(u), int(v)) for u, v in edge_index.t().tolist()]
    g = _graph_from_edges(range(n), pairs, edges, gid)
    if nodes is not None:
        nx.set_node_attributes(g, dict(enumerate(nodes)), LABEL)
    g.graph.update(_data_properties(data, {node_label, edge_label}, gid, ignored))
    return g


def _data_labels(data: BaseData, key: str, rows: int, gid: str, required: bool, ignored: set[str]) -> list | None:
    """Integer categories from one-hot rows or an integer vector (or a list of label names), or None when
    `key` holds no categories."""
    if key not in data or data[key] is None:
        if required:
            raise ValueError(f"graph {gid}: the Data object has no attribute {key!r}")
        return None
    if isinstance(data[key], (list, tuple)):  # labels given as names, one per row
        value = [plain(v) for v in data[key]]
        if len(value) != rows:
            raise ValueError(f"graph {gid}: {key!r} has {len(value)} entries, expected {rows}")
        return value
    value = torch.as_tensor(data[key])
    if value.dim() == 2 and value.shape[1] == 1 and not value.is_floating_point():
        value = value[:, 0]
    if value.dim() == 1 and not value.is_floating_point() and value.dtype != torch.bool:
        codes = value.long()
    elif value.dim() == 2 and _one_hot(value):
        codes = value.argmax(1)
    elif required:
        raise ValueError(f"graph {gid}: {key!r} of shape {tuple(value.shape)} is neither one-hot rows nor integers")
    else:
        ignored.add(key)
        return None
    if len(codes) != rows:
        raise ValueError(f"graph {gid}: {key!r} has {len(codes)} rows, expected {rows}")
    return codes.tolist()


def _one_hot(value: torch.Tensor) -> bool:
    return bool(((value == 0) | (value == 1)).all() and (value.sum(1) == 1).all())


def _data_properties(data: BaseData, label_keys: set[str | None], gid: str, ignored: set[str]) -> dict[str, Any]:
    """`y` (when a scalar) and every other scalar attribute of a Data object, as graph attributes."""
    out = {}
    if "y" in data and data.y is not None:
        y = _scalar(data.y)
        if y is not None:
            out["y"] = y
        elif torch.as_tensor(data.y).numel() > 0:
            ignored.add("y")
    for key, item in data:
        if key in _DATA_STRUCTURE or key in label_keys:
            continue
        value = _scalar(item)
        if value is not None:
            out[key] = value
    return out


def _scalar(value: Any) -> Any:
    """A Python int, float, str or bool for a scalar (or a one-element tensor or array), else None."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (np.generic, np.ndarray)) and value.size == 1:
        return value.reshape(-1)[0].item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.reshape(-1)[0].item()
    return None


def plain(value: Any) -> Any:
    """Numpy and torch scalars as Python values, so labels compare and serialise as themselves."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _graph_from_edges(nodes: Iterable[Hashable], pairs: Sequence[tuple], labels: Sequence | None,
                      gid: str) -> nx.Graph:
    """An undirected graph of `pairs`, given in one or both directions. A pair listed more often in one
    direction than the graph needs comes back as a MultiGraph, so that `normalize` counts the merge."""
    directed = Counter(pairs)
    first: dict[frozenset, int] = {}
    for i, (u, v) in enumerate(pairs):
        first.setdefault(frozenset((u, v)), i)
    multiple = {}
    for key, i in first.items():
        u, v = pairs[i]
        multiple[key] = max(directed[(u, v)], directed[(v, u)])
    g = nx.MultiGraph() if any(m > 1 for m in multiple.values()) else nx.Graph()
    g.graph["id"] = gid
    g.add_nodes_from(nodes)
    for key, i in first.items():
        u, v = pairs[i]
        attrs = {} if labels is None or labels[i] is None else {LABEL: labels[i]}
        for _ in range(multiple[key]):
            g.add_edge(u, v, **attrs)
    return g


def _read_path(path: Path, edge_label: str | None) -> list[nx.Graph]:
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_folder(path, edge_label)
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return _read_table(path, edge_label)
    if suffix in (".parquet", ".pq"):
        raise ValueError(f"{path}: a Parquet file of graph records is read by the graph domain, not read_graphs")
    raise ValueError(f"{path}: unknown file type {suffix!r}; expected an edge table (.csv, .tsv) or a folder of "
                     f"edge-list files ({', '.join('*' + s for s in EDGE_LIST_SUFFIXES)})")


def _read_folder(folder: Path, edge_label: str | None) -> list[nx.Graph]:
    # Hidden files are skipped: the writers' temporary files start with a dot.
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in EDGE_LIST_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder}: no edge-list files ({', '.join('*' + s for s in EDGE_LIST_SUFFIXES)}) "
                         "in the folder")
    return [_read_edge_list(path, edge_label) for path in files]


def _read_edge_list(path: Path, edge_label: str | None) -> nx.Graph:
    cells = _read_cells(path, header=None)
    if len(cells) and not _INTEGER.fullmatch(str(cells.iat[0, 0]).strip()):
        cells = cells.iloc[1:].set_axis([str(c).strip() for c in cells.iloc[0]], axis=1)
        label = _label_column(cells, path, edge_label)
        for column in ("source", "target"):
            _require_column(cells, column, path, ("an edge list with a header", "source", "target"))
        return _graph_from_rows(cells["source"], cells["target"], cells[label] if label else None, path, path.stem)
    if edge_label is not None:
        raise ValueError(f"{path}: no header row, so no column is named {edge_label!r}")
    if cells.shape[1] not in (0, 2, 3):
        raise ValueError(f"{path}: {cells.shape[1]} columns; an edge list has `source target [label]`")
    if cells.shape[1] == 0:
        return _graph_from_edges([], [], None, path.stem)
    label = cells[2] if cells.shape[1] == 3 else None
    return _graph_from_rows(cells[0], cells[1], label, path, path.stem)


def _read_table(path: Path, edge_label: str | None) -> list[nx.Graph]:
    cells = _read_cells(path, header=0)
    cells = cells.set_axis([str(c).strip() for c in cells.columns], axis=1)
    for column in TABLE_COLUMNS:
        _require_column(cells, column, path, ("an edge table", *TABLE_COLUMNS))
    label = _label_column(cells, path, edge_label)
    ids = _cells(cells["graph_id"])
    if None in ids:
        raise ValueError(f"{path}: row {ids.index(None) + 1} has an empty 'graph_id'")
    if not len(cells):
        raise ValueError(f"{path}: the edge table has no rows")
    return [_graph_from_rows(rows["source"], rows["target"], rows[label] if label else None, path, str(gid))
            for gid, rows in cells.groupby(pd.Series(ids, index=cells.index), sort=False)]


def _read_cells(path: Path, header: int | None) -> pd.DataFrame:
    """The file's cells as strings (an empty cell as missing); a parse failure names the file."""
    suffix = path.suffix.lower()
    sep = {".csv": ",", ".tsv": "\t"}.get(suffix, r"\s+")
    try:
        return pd.read_csv(path, sep=sep, header=header, dtype=str, keep_default_na=False, na_values=[""],
                           comment="#" if sep == r"\s+" else None, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        if header is not None:
            raise ValueError(f"{path}: the file is empty; an edge table needs a header row") from None
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot parse as {'an edge table' if header is not None else 'an edge list'}: "
                         f"{e}") from e


def _require_column(cells: pd.DataFrame, column: str, path: Path, needs: Sequence[str] = ()) -> None:
    if column not in cells.columns:
        what = f"; {needs[0]} needs columns {', '.join(needs[1:])}" if needs else ""
        raise ValueError(f"{path}: no column {column!r} (columns: {list(cells.columns)}){what}")


def _label_column(cells: pd.DataFrame, path: Path, edge_label: str | None) -> str | None:
    if edge_label is not None:
        _require_column(cells, edge_label, path)
        return edge_label
    return LABEL if LABEL in cells.columns else None


def _graph_from_rows(source: pd.Series, target: pd.Series, label: pd.Series | None, path: Path, gid: str) -> nx.Graph:
    """One graph from rows `source target [label]`; a row without a target is an isolated node."""
    sources = _node_ids(source, path, "source", missing_ok=False)
    targets = _node_ids(target, path, "target", missing_ok=True)
    labels = _labels(label) if label is not None else None
    nodes = sorted(set(sources) | {t for t in targets if t is not None})
    edges = [i for i, t in enumerate(targets) if t is not None]
    pairs = [(sources[i], targets[i]) for i in edges]
    return _graph_from_edges(nodes, pairs, [labels[i] for i in edges] if labels else None, gid)


def _node_ids(column: pd.Series, path: Path, name: str, missing_ok: bool) -> list[int | None]:
    out = []
    for row, cell in enumerate(_cells(column)):
        if cell is None and missing_ok:
            out.append(None)
        elif cell is None or not _INTEGER.fullmatch(cell):
            raise ValueError(f"{path}: row {row + 1} of column {name!r} is {cell!r}, not an integer node id")
        else:
            out.append(int(cell))
    return out


def _labels(column: pd.Series) -> list[int | str | None]:
    """Labels as ints when every one is an integer, else as strings."""
    cells = _cells(column)
    integers = all(c is None or _INTEGER.fullmatch(c) for c in cells)
    return [None if c is None else int(c) if integers else c for c in cells]


def _cells(column: pd.Series) -> list[str | None]:
    """Stripped cell texts, None for an empty or missing cell."""
    return [_cell(value) for value in column.tolist()]


def _cell(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    text = str(value).strip()
    return text or None


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


def normalize(graphs: Iterable[nx.Graph], max_nodes: int | None = None) -> tuple[list[nx.Graph], dict[str, int]]:
    """Graphs in canonical form, and counts of what changed.

    Each graph loses its self-loops (`self_loops_removed`, in edges), a directed graph becomes
    undirected (`directed_graphs_symmetrised`, in graphs), repeated edges merge into one
    (`multi_edges_merged`, in edges removed; a merged edge keeps the first label), and nodes become
    0..n-1. Graphs with no nodes (`empty_dropped`) or more than `max_nodes` (`too_large_dropped`)
    are dropped: whether that is an error is the caller's choice. Only "label" node and edge
    attributes and scalar graph attributes are kept. Every count is present (0 when nothing
    happened); a non-zero count logs one warning naming up to 5 graph ids per kind.
    """
    counts = dict.fromkeys(COUNTS, 0)
    ids: dict[str, list[str]] = {key: [] for key in COUNTS}
    out = []
    for index, g in enumerate(graphs):
        gid = str(g.graph.get("id", index))
        n = g.number_of_nodes()
        if n == 0 or (max_nodes is not None and n > max_nodes):
            _tally(counts, ids, "empty_dropped" if n == 0 else "too_large_dropped", 1, gid)
            continue
        clean, changes = _canonical(g, gid)
        for key, count in changes.items():
            _tally(counts, ids, key, count, gid)
        out.append(clean)
    if any(counts.values()):
        logger.warning("normalising graphs: %s", "; ".join(_describe(key, counts[key], ids[key], max_nodes)
                                                           for key in COUNTS if counts[key]))
    return out, counts


def _canonical(g: nx.Graph, gid: str) -> tuple[nx.Graph, dict[str, int]]:
    nodes = _stable_order(g.nodes)
    index = {v: i for i, v in enumerate(nodes)}
    out = nx.Graph()
    out.graph.update({key: plain(value) for key, value in g.graph.items() if is_scalar(value)})
    out.graph["id"] = gid
    for v in nodes:
        out.add_node(index[v], **_label_of(g.nodes[v], LABEL))
    loops, edges, seen = 0, {}, Counter()
    for u, v, attrs in g.edges(data=True):
        if u == v:
            loops += 1
            continue
        a, b = index[u], index[v]
        seen[(a, b) if g.is_directed() else (min(a, b), max(a, b))] += 1
        edges.setdefault((min(a, b), max(a, b)), _label_of(attrs, LABEL))
    for (a, b), attrs in sorted(edges.items()):
        out.add_edge(a, b, **attrs)
    merged = sum(count - 1 for count in seen.values()) if g.is_multigraph() else 0
    return out, {"self_loops_removed": loops, "directed_graphs_symmetrised": int(g.is_directed()),
                 "multi_edges_merged": merged}


def _stable_order(nodes: Iterable[Hashable]) -> list:
    """Node ids sorted, or in insertion order when they do not sort (ids of mixed types)."""
    nodes = list(nodes)
    try:
        return sorted(nodes)
    except TypeError:
        return nodes


def is_scalar(value: Any) -> bool:
    return isinstance(value, (str, bool, int, float, np.generic)) or (
        isinstance(value, torch.Tensor) and value.numel() == 1)


def _tally(counts: dict[str, int], ids: dict[str, list[str]], key: str, count: int, gid: str) -> None:
    if count:
        counts[key] += count
        ids[key].append(gid)


def _describe(key: str, count: int, ids: list[str], max_nodes: int | None) -> str:
    what = {"self_loops_removed": "self-loop(s) removed", "directed_graphs_symmetrised": "directed graph(s) made "
            "undirected", "multi_edges_merged": "repeated edge(s) merged", "empty_dropped": "empty graph(s) dropped",
            "too_large_dropped": f"graph(s) over max_nodes = {max_nodes} dropped"}[key]
    more = f" and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else ""
    return f"{count} {what} (graphs {', '.join(map(repr, ids[:_SHOWN_IDS]))}{more})"
