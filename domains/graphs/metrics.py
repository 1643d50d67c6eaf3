"""Graph-generation metrics of the SPECTRE / DiGress / GRAN benchmarks on lists of `networkx.Graph`.

Matched definitions (SPECTRE `util/eval_helper.py`, `util/dist_helper.py`; DiGress `src/analysis/spectre_utils.py`,
`dist_helper.py`; GRAN `utils/eval_helper.py`, `utils/dist_helper.py`; GraphRNN `eval/mmd.py`, `eval/stats.py`):

- Squared MMD is the biased (V-statistic) estimate mean k(x, x') + mean k(y, y') - 2 mean k(x, y) over all pairs,
  i == j included; histograms are padded with zeros to a common length and divided by (sum + 1e-6).
- Degree: `nx.degree_histogram`; Gaussian-TV kernel, sigma 1 (kernel="emd": Gaussian-EMD, sigma 1).
- Clustering: histogram of `nx.clustering` over 100 bins on [0, 1]; Gaussian-TV, sigma 0.1
  (kernel="emd": Gaussian-EMD, sigma 0.1, distance_scaling = number of bins).
- Spectral: eigenvalues of the normalised Laplacian, 200 bins on (-1e-5, 2), as a pmf; Gaussian-TV, sigma 1
  (kernel="emd": Gaussian-EMD, sigma 1).
- Orbit: the 15 node-orbit counts of graphlets on 2-4 nodes (ORCA "node 4"), all 15 kept, summed over nodes and
  divided by the number of nodes; not normalised as a histogram; Gaussian-TV on the raw vector with sigma 30
  (kernel="emd": plain Gaussian RBF, sigma 30, as GraphRNN / GDSS).
- Empty generated graphs (0 nodes) are left out of every MMD, as in those codebases, and count as invalid.
- Planar validity: connected and planar. SBM validity: SPECTRE's Wald test on a fitted block model (the fit here
  needs no graph-tool; see `sbm_p_value`). Uniqueness, novelty and V.U.N. count as SPECTRE's
  `eval_fraction_unique_non_isomorphic_valid` and `eval_fraction_isomorphic` do.

The orbit counts are our own enumeration of connected induced 3- and 4-node subgraphs; ORCA (Hocevar & Demsar) is
GPL-3 and this project is Apache-2.0, so it is not vendored. The counts follow ORCA's orbit numbering.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Literal

import networkx as nx
import numpy as np
import scipy.linalg
import scipy.stats
from numpy.typing import ArrayLike

Kernel = Callable[..., np.ndarray]
KernelName = Literal["tv", "emd"]
Validity = Literal["planar", "sbm"] | Callable[[nx.Graph], bool] | None

HIST_EPS = 1e-6  # histograms are divided by (sum + 1e-6) before the kernel, as GRAN / SPECTRE do
CLUSTERING_BINS = 100
SPECTRAL_BINS = 200
ORBIT_SIGMA = 30.0
PARALLEL_MIN_EDGES = 20_000  # below this many edges in all, a process pool costs more than it saves
_CHUNK_ELEMENTS = 1 << 22  # bound on the [rows, cols, length] block a broadcast kernel builds at once


# --- kernels: each broadcasts over leading axes and pads the last axis to a common length -------------------------


def _padded(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.atleast_1d(np.asarray(x, dtype=np.float64)), np.atleast_1d(np.asarray(y, dtype=np.float64))
    length = max(x.shape[-1], y.shape[-1])
    return tuple(np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, length - a.shape[-1])]) for a in (x, y))


def gaussian_tv(x: ArrayLike, y: ArrayLike, sigma: float = 1.0) -> np.ndarray:
    """exp(-TV^2 / (2 sigma^2)) with TV = half the L1 distance of the (padded) vectors."""
    x, y = _padded(x, y)
    tv = np.abs(x - y).sum(-1) / 2.0
    return np.exp(-tv * tv / (2 * sigma * sigma))


def gaussian_emd(x: ArrayLike, y: ArrayLike, sigma: float = 1.0, distance_scaling: float = 1.0) -> np.ndarray:
    """exp(-EMD^2 / (2 sigma^2)) with EMD between 1-D histograms under the ground metric |i - j| / distance_scaling."""
    x, y = _padded(x, y)
    # On a line the EMD is the L1 distance of the CDFs: exactly what pyemd returns for the |i - j| ground metric when
    # both histograms carry the same mass (here up to the 1e-6 normalisation slack), so pyemd is not needed.
    emd = np.abs(np.cumsum(x, -1) - np.cumsum(y, -1))[..., :-1].sum(-1) / distance_scaling
    return np.exp(-emd * emd / (2 * sigma * sigma))


def gaussian(x: ArrayLike, y: ArrayLike, sigma: float = 1.0) -> np.ndarray:
    """The Gaussian RBF exp(-||x - y||^2 / (2 sigma^2)) on (padded) vectors."""
    x, y = _padded(x, y)
    d2 = np.square(x - y).sum(-1)
    return np.exp(-d2 / (2 * sigma * sigma))


def _stacked(samples: Sequence[ArrayLike], length: int) -> np.ndarray:
    out = np.zeros((len(samples), length))
    for i, s in enumerate(samples):
        s = np.atleast_1d(np.asarray(s, dtype=np.float64))
        out[i, : s.shape[0]] = s
    return out


def _mean_kernel(a: np.ndarray, b: np.ndarray, kernel: Kernel, kwargs: dict) -> float:
    rows = max(1, _CHUNK_ELEMENTS // max(1, b.shape[0] * b.shape[1]))
    total = 0.0
    for start in range(0, a.shape[0], rows):
        total += float(kernel(a[start : start + rows, None, :], b[None, :, :], **kwargs).sum())
    return total / (a.shape[0] * b.shape[0])


def mmd2(
    samples_x: Sequence[ArrayLike],
    samples_y: Sequence[ArrayLike],
    kernel: Kernel,
    is_hist: bool = True,
    **kernel_kwargs,
) -> float:
    """Squared MMD between two sets of 1-D samples; `kernel` must broadcast over leading axes as those above do.

    NaN when either set is empty.
    """
    if len(samples_x) == 0 or len(samples_y) == 0:
        return float("nan")
    length = max(np.atleast_1d(np.asarray(s)).shape[0] for s in [*samples_x, *samples_y])
    x, y = _stacked(samples_x, length), _stacked(samples_y, length)
    if is_hist:
        x = x / (x.sum(1, keepdims=True) + HIST_EPS)
        y = y / (y.sum(1, keepdims=True) + HIST_EPS)
    xx = _mean_kernel(x, x, kernel, kernel_kwargs)
    yy = _mean_kernel(y, y, kernel, kernel_kwargs)
    return xx + yy - 2 * _mean_kernel(x, y, kernel, kernel_kwargs)


# --- per-graph descriptors ------------------------------------------------------------------------------------------


def degree_histogram(g: nx.Graph) -> np.ndarray:
    """Counts of nodes per degree 0..max degree (empty for a graph without nodes)."""
    return np.asarray(nx.degree_histogram(g), dtype=np.float64)


def clustering_histogram(g: nx.Graph, bins: int = CLUSTERING_BINS) -> np.ndarray:
    """Histogram of the local clustering coefficients over `bins` equal bins on [0, 1]."""
    hist, _ = np.histogram(list(nx.clustering(g).values()), bins=bins, range=(0.0, 1.0))
    return hist.astype(np.float64)


def spectral_histogram(g: nx.Graph, bins: int = SPECTRAL_BINS) -> np.ndarray:
    """Pmf of the normalised-Laplacian eigenvalues over `bins` bins on (-1e-5, 2); zeros for a graph without nodes."""
    if g.number_of_nodes() == 0:
        return np.zeros(bins)
    eigenvalues = scipy.linalg.eigvalsh(nx.normalized_laplacian_matrix(g).toarray())
    # As in SPECTRE, an eigenvalue rounded to just above 2 (bipartite graphs) falls outside the range and is dropped.
    hist, _ = np.histogram(eigenvalues, bins=bins, range=(-1e-5, 2))
    total = hist.sum()
    return hist / total if total > 0 else hist.astype(np.float64)


# Orbit of a node in a connected 4-node graphlet. The product of the four in-graphlet degrees names the graphlet
# (path 4, star 3, cycle 16, paw 12, diamond 36, clique 81); with the node's own degree it names the orbit:
# path 4 (end) 5 (inside), star 6 (leaf) 7 (centre), cycle 8, paw 9 (pendant) 10 (degree 2) 11 (degree 3),
# diamond 12 (degree 2) 13 (degree 3), clique 14. Stored flat at 4 * product + degree.
_ORBIT4 = {(4, 1): 4, (4, 2): 5, (3, 1): 6, (3, 3): 7, (16, 2): 8, (12, 1): 9, (12, 2): 10, (12, 3): 11,
           (36, 2): 12, (36, 3): 13, (81, 3): 14}  # fmt: skip
_ORBIT4_FLAT = [0] * (4 * 81 + 4)
for (product, degree), orbit in _ORBIT4.items():
    _ORBIT4_FLAT[4 * product + degree] = orbit
del product, degree, orbit


def _adjacency_sets(g: nx.Graph) -> list[set[int]]:
    index = {v: i for i, v in enumerate(g)}
    adj: list[set[int]] = [set() for _ in index]
    for u, v in g.edges():
        if u != v:
            adj[index[u]].add(index[v])
            adj[index[v]].add(index[u])
    return adj


def orbit_counts(g: nx.Graph) -> np.ndarray:
    """Per-node counts [n_nodes, 15] of the orbits of induced graphlets on 2-4 nodes, in ORCA's numbering.

    Orbit 0 is the degree; 1 / 2 the end / middle of an induced 3-path; 3 a triangle; 4-14 the 4-node orbits
    listed at `_ORBIT4`. Each connected induced 3- or 4-node subgraph is enumerated once (ESU, Wernicke 2006:
    grown from its smallest node, only through nodes outside the current subgraph's neighbourhood).
    """
    adj = _adjacency_sets(g)
    n = len(adj)
    table = _ORBIT4_FLAT
    c = [0] * (15 * n)  # flat Python list: numpy scalar updates in this loop would be several times slower
    for v in range(n):
        nv = adj[v]
        c[15 * v] = len(nv)
        ext1 = [u for u in nv if u > v]
        while ext1:
            w = ext1.pop()
            nw = adj[w]
            hood2 = nv | nw
            ext2 = ext1 + [u for u in nw if u > v and u not in nv]
            while ext2:
                x = ext2.pop()
                nx_ = adj[x]
                dv, dw, dx = (w in nv) + (x in nv), (v in nw) + (x in nw), (v in nx_) + (w in nx_)
                if dv + dw + dx == 6:
                    c[15 * v + 3] += 1
                    c[15 * w + 3] += 1
                    c[15 * x + 3] += 1
                else:  # an induced path: degree 1 is orbit 1, degree 2 is orbit 2
                    c[15 * v + dv] += 1
                    c[15 * w + dw] += 1
                    c[15 * x + dx] += 1
                for y in ext2 + [u for u in nx_ if u > v and u not in hood2]:
                    ny = adj[y]
                    ev, ew, ex = dv + (y in nv), dw + (y in nw), dx + (y in nx_)
                    ey = (v in ny) + (w in ny) + (x in ny)
                    base = 4 * ev * ew * ex * ey
                    c[15 * v + table[base + ev]] += 1
                    c[15 * w + table[base + ew]] += 1
                    c[15 * x + table[base + ex]] += 1
                    c[15 * y + table[base + ey]] += 1
    return np.asarray(c, dtype=np.int64).reshape(n, 15)


def orbit_feature(g: nx.Graph) -> np.ndarray:
    """All 15 orbit counts summed over nodes and divided by the number of nodes (SPECTRE's `orbit_stats_all`)."""
    n = g.number_of_nodes()
    return orbit_counts(g).sum(0) / n if n else np.zeros(15)


# --- MMDs of the four descriptors -----------------------------------------------------------------------------------


def _workers(n_jobs: int | None, graphs: Sequence[nx.Graph]) -> int:
    if n_jobs is not None:
        return max(1, n_jobs)
    if sum(g.number_of_edges() for g in graphs) < PARALLEL_MIN_EDGES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, len(graphs))


def _map(fn: Callable[[nx.Graph], object], graphs: Sequence[nx.Graph], n_jobs: int | None) -> list:
    workers = _workers(n_jobs, graphs)
    if workers <= 1 or len(graphs) < 2:
        return [fn(g) for g in graphs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, graphs, chunksize=max(1, len(graphs) // (4 * workers))))


def _non_empty(graphs: Sequence[nx.Graph]) -> list[nx.Graph]:
    return [g for g in graphs if g.number_of_nodes() > 0]


def _kernel(kind: KernelName, descriptor: str) -> tuple[Kernel, bool, dict[str, float]]:
    """The published kernel, histogram flag and kernel arguments for one descriptor."""
    if kind not in ("tv", "emd"):
        raise ValueError(f"kernel must be 'tv' or 'emd', got {kind!r}")
    if descriptor == "orbit":
        return (gaussian_tv if kind == "tv" else gaussian), False, {"sigma": ORBIT_SIGMA}
    sigma = 0.1 if descriptor == "clustering" else 1.0
    if kind == "tv":
        return gaussian_tv, True, {"sigma": sigma}
    scaling = float(CLUSTERING_BINS) if descriptor == "clustering" else 1.0
    return gaussian_emd, True, {"sigma": sigma, "distance_scaling": scaling}


_DESCRIBE: dict[str, Callable[[nx.Graph], np.ndarray]] = {
    "degree": degree_histogram,
    "clustering": clustering_histogram,
    "orbit": orbit_feature,
    "spectral": spectral_histogram,
}


def _feature_mmd(name: str, reference: list[np.ndarray], generated: list[np.ndarray], kernel: KernelName) -> float:
    fn, is_hist, kwargs = _kernel(kernel, name)
    return mmd2(reference, generated, fn, is_hist=is_hist, **kwargs)


def _mmd(
    name: str, reference: Sequence[nx.Graph], generated: Sequence[nx.Graph], kernel: KernelName, n_jobs: int | None
) -> float:
    reference, generated = _non_empty(reference), _non_empty(generated)
    features = _map(_DESCRIBE[name], [*reference, *generated], n_jobs)
    return _feature_mmd(name, features[: len(reference)], features[len(reference) :], kernel)


def mmd_degree(
    reference: Sequence[nx.Graph], generated: Sequence[nx.Graph], kernel: KernelName = "tv", n_jobs: int | None = None
) -> float:
    """Squared MMD of degree histograms (Gaussian-TV, sigma 1; "emd": Gaussian-EMD, sigma 1)."""
    return _mmd("degree", reference, generated, kernel, n_jobs)


def mmd_clustering(
    reference: Sequence[nx.Graph], generated: Sequence[nx.Graph], kernel: KernelName = "tv", n_jobs: int | None = None
) -> float:
    """Squared MMD of 100-bin clustering histograms (sigma 0.1; "emd" scales bin distances by 1/100)."""
    return _mmd("clustering", reference, generated, kernel, n_jobs)


def mmd_orbit(
    reference: Sequence[nx.Graph], generated: Sequence[nx.Graph], kernel: KernelName = "tv", n_jobs: int | None = None
) -> float:
    """Squared MMD of mean orbit counts (Gaussian-TV, sigma 30; "emd": Gaussian RBF, sigma 30)."""
    return _mmd("orbit", reference, generated, kernel, n_jobs)


def mmd_spectral(
    reference: Sequence[nx.Graph], generated: Sequence[nx.Graph], kernel: KernelName = "tv", n_jobs: int | None = None
) -> float:
    """Squared MMD of normalised-Laplacian spectrum pmfs (Gaussian-TV, sigma 1; "emd": Gaussian-EMD, sigma 1)."""
    return _mmd("spectral", reference, generated, kernel, n_jobs)


# --- validity -------------------------------------------------------------------------------------------------------


def is_planar_valid(g: nx.Graph) -> bool:
    """Connected and planar (SPECTRE's planar validity); a graph without nodes is invalid."""
    return g.number_of_nodes() > 0 and nx.is_connected(g) and nx.check_planarity(g)[0]


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x * np.log(np.where(y > 0, y, 1.0)), 0.0)


def _block_counts(adj: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block sizes, edges per block pair (intra on the diagonal) and possible pairs per block pair."""
    z = np.eye(labels.max() + 1)[labels]
    sizes = z.sum(0)
    edges = z.T @ adj @ z
    np.fill_diagonal(edges, np.diag(edges) / 2)
    pairs = np.outer(sizes, sizes)
    np.fill_diagonal(pairs, sizes * (sizes - 1) / 2)
    return sizes, edges, pairs


def _icl(adj: np.ndarray, labels: np.ndarray) -> float:
    """Integrated completed likelihood of a Bernoulli SBM partition (Daudin, Picard & Robin 2008)."""
    sizes, edges, pairs = _block_counts(adj, labels)
    k, n = len(sizes), sizes.sum()
    upper = np.triu_indices(k)
    e, m = edges[upper], pairs[upper]
    p = np.divide(e, m, out=np.zeros_like(e), where=m > 0)
    loglik = (_xlogy(e, p) + _xlogy(m - e, 1 - p)).sum() + _xlogy(sizes, sizes / n).sum()
    return float(loglik - k * (k + 1) / 4 * np.log(n * (n - 1) / 2) - (k - 1) / 2 * np.log(n))


def _refine(adj: np.ndarray, labels: np.ndarray, sweeps: int = 10) -> np.ndarray:
    """Classification-EM sweeps: move every node to its most likely block under the current block densities."""
    for _ in range(sweeps):
        sizes, edges, pairs = _block_counts(adj, labels)
        log_p = np.log(np.clip(edges / np.maximum(pairs, 1), 1e-6, 1 - 1e-6))
        log_q = np.log(np.clip(1 - edges / np.maximum(pairs, 1), 1e-6, 1 - 1e-6))
        z = np.eye(len(sizes))[labels]
        links = adj @ z
        others = sizes[None, :] - z
        score = links @ log_p + (others - links) @ log_q + np.log(sizes / sizes.sum())
        moved = score.argmax(1)
        if (moved == labels).all():
            break
        labels = np.unique(moved, return_inverse=True)[1]
    return labels


def _merge(adj: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Greedily merge the pair of blocks that most raises the ICL, while one does."""
    best = _icl(adj, labels)
    while labels.max() > 0:
        candidates = []
        for a in range(labels.max() + 1):
            for b in range(a + 1, labels.max() + 1):
                merged = np.unique(np.where(labels == b, a, labels), return_inverse=True)[1]
                candidates.append((_icl(adj, merged), merged))
        score, merged = max(candidates, key=lambda c: c[0])
        if score <= best:
            break
        best, labels = score, merged
    return labels


def fit_blocks(g: nx.Graph, seed: int = 0) -> np.ndarray:
    """Block labels for the nodes of `g` (in `g`'s node order), without graph-tool.

    SPECTRE fits blocks by minimising graph-tool's SBM description length (plus merge-split MCMC). Here: seeded
    Louvain communities (networkx) as the start, classification-EM node moves, greedy block merges by ICL, and EM
    again. Louvain alone maximises modularity, which splits a large block of a 2-block graph about 1 time in 10
    and never returns a single block; the ICL merges are the model selection that puts those splits back and turn
    an Erdos-Renyi graph into one block, as the description length does. Limits: only assortative structure is
    found (blocks sparser inside than between them are not, where graph-tool would find them), and the result is a
    local optimum, so on borderline graphs it can disagree with graph-tool's fit; on SPECTRE-style SBMs it recovers
    the planted blocks in about 99% of samples.
    """
    adj = nx.to_numpy_array(g, weight=None)
    np.fill_diagonal(adj, 0)
    index = {v: i for i, v in enumerate(g)}
    labels = np.zeros(len(index), dtype=np.int64)
    if len(index) < 2:
        return labels
    for block, members in enumerate(nx.community.louvain_communities(g, seed=seed)):
        labels[[index[v] for v in members]] = block
    labels = _refine(adj, labels)
    return _refine(adj, _merge(adj, labels))


def sbm_p_value(g: nx.Graph, p_intra: float = 0.3, p_inter: float = 0.005, strict: bool = True) -> float:
    """SPECTRE's mean Wald p-value of the fitted block densities against p_intra / p_inter.

    Strict: 0.0 unless there are 2-5 blocks of 20-40 nodes each. Every entry of the block-pair matrix counts
    (inter-block pairs twice, as SPECTRE's matrix holds both (r, s) and (s, r)).
    """
    if g.number_of_nodes() < 2 or g.number_of_edges() == 0:
        return 0.0
    adj = nx.to_numpy_array(g, weight=None)
    np.fill_diagonal(adj, 0)
    sizes, edges, _ = _block_counts(adj, fit_blocks(g))
    if strict and not (2 <= len(sizes) <= 5 and sizes.min() >= 20 and sizes.max() <= 40):
        return 0.0
    # The 1e-6 terms are SPECTRE's; intra density over n(n-1) directed pairs equals edges over n(n-1)/2 pairs.
    est_intra = 2 * np.diag(edges) / (sizes * (sizes - 1) + 1e-6)
    inter = edges.copy()
    np.fill_diagonal(inter, 0)
    est_inter = inter / (np.outer(sizes, sizes) + 1e-6)
    wald = (est_inter - p_inter) ** 2 / (est_inter * (1 - est_inter) + 1e-6)
    np.fill_diagonal(wald, (est_intra - p_intra) ** 2 / (est_intra * (1 - est_intra) + 1e-6))
    return float((1 - scipy.stats.chi2.cdf(np.abs(wald), 1)).mean())


def is_sbm_valid(g: nx.Graph, p_intra: float = 0.3, p_inter: float = 0.005, strict: bool = True) -> bool:
    """SPECTRE's SBM validity: mean Wald p-value above 0.9 (strict: 2-5 blocks of 20-40 nodes as well)."""
    return sbm_p_value(g, p_intra, p_inter, strict) > 0.9


_VALIDITY: dict[str, Callable[[nx.Graph], bool]] = {"planar": is_planar_valid, "sbm": is_sbm_valid}


def _validity_fn(validity: Validity) -> Callable[[nx.Graph], bool]:
    if callable(validity):
        return validity
    if validity not in _VALIDITY:
        raise ValueError(f"validity must be 'planar', 'sbm' or a callable, got {validity!r}")
    return _VALIDITY[validity]


# --- uniqueness, novelty, V.U.N. ------------------------------------------------------------------------------------


def _iso_key(g: nx.Graph) -> tuple[int, int, str]:
    with warnings.catch_warnings():
        # networkx >= 3.5 warns that unlabelled hashes changed across versions; they only bucket graphs here.
        warnings.simplefilter("ignore", UserWarning)
        return g.number_of_nodes(), g.number_of_edges(), nx.weisfeiler_lehman_graph_hash(g)


class _IsomorphismClasses:
    """Graphs bucketed by WL hash; membership is an exact isomorphism test within one bucket."""

    def __init__(self, graphs: Sequence[nx.Graph] = ()) -> None:
        self._buckets: dict[tuple[int, int, str], list[nx.Graph]] = defaultdict(list)
        for g in graphs:
            self._buckets[_iso_key(g)].append(g)

    def add_if_new(self, g: nx.Graph) -> bool:
        """Add g unless an isomorphic graph is held; True when it was added."""
        bucket = self._buckets[_iso_key(g)]
        if any(nx.is_isomorphic(g, h) for h in bucket):
            return False
        bucket.append(g)
        return True

    def __contains__(self, g: nx.Graph) -> bool:
        return any(nx.is_isomorphic(g, h) for h in self._buckets.get(_iso_key(g), ()))


def _first_copies(generated: Sequence[nx.Graph]) -> np.ndarray:
    seen = _IsomorphismClasses()
    return np.array([seen.add_if_new(g) for g in generated], dtype=bool)


def _novel(generated: Sequence[nx.Graph], train: Sequence[nx.Graph]) -> np.ndarray:
    known = _IsomorphismClasses(train)
    return np.array([g not in known for g in generated], dtype=bool)


def _valid(generated: Sequence[nx.Graph], validity: Validity) -> np.ndarray:
    fn = _validity_fn(validity)
    return np.array([g.number_of_nodes() > 0 and bool(fn(g)) for g in generated], dtype=bool)


def _fraction(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else float("nan")


def fraction_unique(generated: Sequence[nx.Graph]) -> float:
    """Fraction of generated graphs not isomorphic to an earlier generated graph."""
    return _fraction(_first_copies(generated))


def fraction_novel(generated: Sequence[nx.Graph], train: Sequence[nx.Graph]) -> float:
    """Fraction of generated graphs not isomorphic to any training graph."""
    return _fraction(_novel(generated, train))


def fraction_valid(generated: Sequence[nx.Graph], valid: Validity) -> float:
    """Fraction of generated graphs that are valid ("planar", "sbm" or a predicate); empty graphs are invalid."""
    return _fraction(_valid(generated, valid))


def vun(generated: Sequence[nx.Graph], train: Sequence[nx.Graph], valid: Validity) -> float:
    """Fraction of generated graphs that are valid, unique (the first copy counts) and novel."""
    return _fraction(_valid(generated, valid) & _first_copies(generated) & _novel(generated, train))


# --- everything at once ---------------------------------------------------------------------------------------------


def _descriptors(g: nx.Graph) -> tuple[np.ndarray, ...]:
    return tuple(describe(g) for describe in _DESCRIBE.values())


MMDS = tuple(_DESCRIBE)  # the squared MMDs `graph_metrics` reports
Descriptors = list[tuple[np.ndarray, ...]]  # per non-empty graph, one descriptor per name of MMDS


def describe(graphs: Sequence[nx.Graph], n_jobs: int | None = None) -> Descriptors:
    """Every descriptor of every non-empty graph (empty ones are left out of every MMD), computed once,
    in a process pool when the set is large (`n_jobs` overrides): a reference set described once
    serves any number of generated sets and kernels."""
    return _map(_descriptors, _non_empty(graphs), n_jobs)


def mmds(reference: Descriptors, generated: Descriptors, kernel: KernelName = "tv") -> dict[str, float]:
    """The squared MMDs `degree`, `clustering`, `orbit`, `spectral` between two described sets."""
    return {name: _feature_mmd(name, [d[i] for d in reference], [d[i] for d in generated], kernel)
            for i, name in enumerate(MMDS)}


def sample_metrics(generated: Sequence[nx.Graph], train: Sequence[nx.Graph] | None = None,
                   validity: Validity = None) -> dict[str, float]:
    """With `train`: `unique` and `novel`. With `validity`: `valid`, and `vun` when `train` is given too."""
    metrics: dict[str, float] = {}
    if train is not None:
        first, novel = _first_copies(generated), _novel(generated, train)
        metrics["unique"], metrics["novel"] = _fraction(first), _fraction(novel)
    if validity is not None:
        valid = _valid(generated, validity)
        metrics["valid"] = _fraction(valid)
        if train is not None:
            metrics["vun"] = _fraction(valid & first & novel)
    return metrics


def graph_metrics(
    reference: Sequence[nx.Graph],
    generated: Sequence[nx.Graph],
    train: Sequence[nx.Graph] | None = None,
    validity: Validity = None,
    kernel: KernelName = "tv",
    n_jobs: int | None = None,
) -> dict[str, float]:
    """`mmds` of `generated` to `reference` and the `sample_metrics` of `generated`."""
    return {**mmds(describe(reference, n_jobs), describe(generated, n_jobs), kernel),
            **sample_metrics(generated, train, validity)}


def reference_metrics(
    reference: Sequence[nx.Graph],
    train: Sequence[nx.Graph],
    validity: Validity = None,
    kernel: KernelName = "tv",
    n_jobs: int | None = None,
) -> dict[str, float]:
    """The train-vs-reference MMDs (and training-set validity) to report beside each generated-set number."""
    return graph_metrics(reference, train, validity=validity, kernel=kernel, n_jobs=n_jobs)
