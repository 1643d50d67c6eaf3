"""The synthetic benchmarks of SPECTRE (Martinkus et al. 2022) and DiGress (Vignac et al. 2023), seeded.

DiGress trains on the graphs SPECTRE generated (`data/community_12_21_100.pt`, `planar_64_200.pt`,
`sbm_200.pt` of KarolisMart/SPECTRE, made by its `data.py`); these are the same definitions, drawn
afresh from one seed:

- community-small (100 graphs): the generator of Niu et al. 2020 (EDP-GNN, reused by GDSS and by
  SPECTRE's `n_community`): a total size n uniform in 12..20, two communities of n // 2 nodes each
  (so 12, 14, ..., 20 nodes), G(n // 2, 0.7) inside each, and every cross pair joined with
  probability 2 * 0.05 / (n // 2), which makes the expected number of cross edges 0.05 per node;
  a graph without a cross edge gets one between the first node of each community. Communities are
  drawn connected, so every graph is connected, as all of SPECTRE's are.
- planar (200 graphs of 64 nodes): points uniform in the unit square, the edges of the triangles
  of their Delaunay triangulation (planar and connected).
- sbm (200 graphs): 2..5 communities (uniform), each of 20..40 nodes (uniform), edge probability
  0.3 inside a community and 0.005 between communities; `g.graph["communities"]` holds the number.

Where the published code is seeded oddly, the definition is kept and the oddity is not: SPECTRE
seeds the two G(n, 0.7) communities with 0 and 1 in every graph (so all graphs of one size share
their communities) and joins every pair of connected components (not just the two communities;
this is what keeps its graphs connected); SBM graphs are seeded by their index. Here every draw
comes from `numpy.random.default_rng(seed)`, networkx getting integer seeds drawn from it, so one
seed gives the same graphs everywhere.

Splits (`split`) follow SPECTRE's GRAN-like rule: 20% test (rounded), 80% of the rest train, the
remainder val: 64/16/20 of 100 graphs, 128/32/40 of 200. As in SPECTRE (`random_split` with a
seeded generator) and DiGress (`torch.randperm` with seed 0, first the train indices, then val,
then test), a seeded permutation assigns graphs to splits; as in DiGress, each split keeps the
generation order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import networkx as nx
import numpy as np
from scipy.spatial import Delaunay

SPLITS = ("train", "val", "test")


def community_small(count: int = 100, seed: int = 0) -> list[nx.Graph]:
    """`count` two-community graphs of 12..20 nodes (see the module docstring)."""
    rng = np.random.default_rng(seed)
    return [_two_communities(int(rng.integers(12, 21)) // 2, rng, f"community-small-{i}") for i in range(count)]


def _two_communities(size: int, rng: np.random.Generator, gid: str) -> nx.Graph:
    """Two G(size, 0.7) communities on nodes 0..size-1 and size..2 size-1, joined by sparse cross edges."""
    edges = [(u + offset, v + offset) for offset in (0, size) for u, v in _connected_gnp(size, 0.7, rng).edges()]
    bridge = 2 * 0.05 / size  # Niu et al.: expected cross edges = 0.05 per node, for two communities
    cross = np.argwhere(rng.random((size, size)) < bridge)
    edges += [(int(i), size + int(j)) for i, j in cross] or [(0, size)]
    return _graph(2 * size, edges, gid)


def _connected_gnp(n: int, p: float, rng: np.random.Generator) -> nx.Graph:
    """G(n, p) drawn until connected (at p = 0.7 and n >= 6, about 1 draw in 70 is not), so that the
    benchmark's graphs are connected, as SPECTRE's are: its code joins every connected component."""
    while True:
        g = nx.gnp_random_graph(n, p, seed=_nx_seed(rng))
        if nx.is_connected(g):
            return g


def planar(count: int = 200, nodes: int = 64, seed: int = 0) -> list[nx.Graph]:
    """`count` Delaunay triangulations of `nodes` points uniform in the unit square."""
    rng = np.random.default_rng(seed)
    return [_delaunay(nodes, rng, f"planar-{i}") for i in range(count)]


def _delaunay(nodes: int, rng: np.random.Generator, gid: str) -> nx.Graph:
    while True:
        simplices = Delaunay(rng.random((nodes, 2))).simplices
        # Qhull leaves out a point that coincides with another (probability ~0 for random floats): redraw.
        if len(np.unique(simplices)) == nodes:
            break
    edges = [(int(t[a]), int(t[b])) for t in simplices for a, b in ((0, 1), (1, 2), (2, 0))]
    return _graph(nodes, edges, gid)


def sbm(count: int = 200, seed: int = 0) -> list[nx.Graph]:
    """`count` stochastic block models of 2..5 communities of 20..40 nodes, p 0.3 inside and 0.005 across."""
    rng = np.random.default_rng(seed)
    return [_block_model(rng, f"sbm-{i}") for i in range(count)]


def _block_model(rng: np.random.Generator, gid: str) -> nx.Graph:
    k = int(rng.integers(2, 6))
    sizes = [int(s) for s in rng.integers(20, 41, size=k)]
    probs = np.full((k, k), 0.005)
    np.fill_diagonal(probs, 0.3)
    g = nx.stochastic_block_model(sizes, probs.tolist(), seed=_nx_seed(rng))
    return _graph(sum(sizes), g.edges(), gid, communities=k)


BENCHMARKS: dict[str, Callable[..., list[nx.Graph]]] = {"community-small": community_small, "planar": planar,
                                                        "sbm": sbm}


def split_sizes(total: int) -> tuple[int, int, int]:
    """(train, val, test) by SPECTRE's rule: 64/16/20 of 100 graphs, 128/32/40 of 200."""
    test = int(round(total * 0.2))
    train = int(round((total - test) * 0.8))
    return train, total - train - test, test


def split(graphs: Sequence[nx.Graph], name: str, seed: int = 0) -> dict[str, list[nx.Graph]]:
    """The benchmark `name`'s train/val/test split of `graphs` by a permutation seeded with `seed`;
    each split keeps the order of `graphs`."""
    _check_name(name)
    train, val, _ = split_sizes(len(graphs))
    order = np.random.default_rng(seed).permutation(len(graphs))
    parts = {"train": order[:train], "val": order[train:train + val], "test": order[train + val:]}
    return {part: [graphs[i] for i in sorted(int(i) for i in indices)] for part, indices in parts.items()}


def benchmark(name: str, seed: int = 0) -> dict[str, list[nx.Graph]]:
    """The benchmark `name` ("community-small", "planar" or "sbm") at its published size, split."""
    _check_name(name)
    return split(BENCHMARKS[name](seed=seed), name, seed=seed)


def _check_name(name: str) -> None:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")


def _nx_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**63 - 1))


def _graph(n: int, edges: Iterable[tuple[int, int]], gid: str, **attrs: object) -> nx.Graph:
    """A canonical graph: nodes 0..n-1, undirected simple edges inserted in sorted order, an id."""
    g = nx.Graph(id=gid, **attrs)
    g.add_nodes_from(range(n))
    g.add_edges_from(sorted({(min(u, v), max(u, v)) for u, v in edges if u != v}))
    return g
