"""Tests of the graph-generation metrics (domains/graphs/metrics.py): known answers on small graphs.

Orbit counts are checked by hand on the 4-node graphlets and against a brute-force count that classifies every
node subset by isomorphism to a template graphlet; MMDs against hand computation and explicit loops.
"""

import itertools
import math

import networkx as nx
import numpy as np
import pytest
import scipy.stats

from archipelago.domains.graphs import metrics

MMD_KEYS = ("degree", "clustering", "orbit", "spectral")


def paw() -> nx.Graph:
    """A triangle 0-1-2 with a pendant node 3 on node 0."""
    return nx.Graph([(0, 1), (1, 2), (0, 2), (0, 3)])


def relabelled(g: nx.Graph, seed: int) -> nx.Graph:
    nodes = list(g)
    shuffled = np.random.default_rng(seed).permutation(len(nodes))
    return nx.relabel_nodes(g, {v: f"n{shuffled[i]}" for i, v in enumerate(nodes)})


def sbm_sample(seed: int) -> nx.Graph:
    """SPECTRE's SBM family: 2-5 blocks of 20-40 nodes, p_intra 0.3, p_inter 0.005."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    probs = np.full((k, k), 0.005)
    np.fill_diagonal(probs, 0.3)
    return nx.stochastic_block_model(rng.integers(20, 41, size=k).tolist(), probs.tolist(), seed=seed)


def orbit_rows(counts: dict[int, dict[int, int]]) -> np.ndarray:
    rows = np.zeros((len(counts), 15), dtype=np.int64)
    for node, orbits in counts.items():
        for orbit, count in orbits.items():
            rows[node, orbit] = count
    return rows


# --- MMD --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed() -> list[nx.Graph]:
    return [nx.path_graph(6), nx.cycle_graph(7), nx.complete_graph(5), paw(), nx.grid_2d_graph(3, 4), nx.star_graph(5)]


@pytest.mark.parametrize("kernel", ["tv", "emd"])
def test_a_set_against_itself_has_mmd_exactly_zero(mixed, kernel):
    assert metrics.graph_metrics(mixed, mixed, kernel=kernel) == dict.fromkeys(MMD_KEYS, 0.0)
    for mmd in (metrics.mmd_degree, metrics.mmd_clustering, metrics.mmd_orbit, metrics.mmd_spectral):
        assert mmd(mixed, mixed, kernel=kernel) == 0.0


@pytest.mark.parametrize("kernel", ["tv", "emd"])
def test_paths_and_complete_graphs_are_apart(kernel):
    paths = [nx.path_graph(n) for n in range(5, 10)]
    cliques = [nx.complete_graph(n) for n in range(5, 10)]
    result = metrics.graph_metrics(paths, cliques, kernel=kernel)
    assert all(result[k] > 0.01 for k in MMD_KEYS), result
    assert result["degree"] == metrics.mmd_degree(paths, cliques, kernel=kernel)
    assert result["clustering"] == metrics.mmd_clustering(paths, cliques, kernel=kernel)
    assert result["orbit"] == metrics.mmd_orbit(paths, cliques, kernel=kernel)
    assert result["spectral"] == metrics.mmd_spectral(paths, cliques, kernel=kernel)


def test_tv_mmd_by_hand():
    # TV(x1, x2) = 1/2, TV(x1, y) = 1, TV(x2, y) = 1/2; k = exp(-TV^2 / 2).
    expected = 1.5 - 0.5 * math.exp(-1 / 8) - math.exp(-1 / 2)
    pmfs = metrics.mmd2([[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0]], metrics.gaussian_tv, is_hist=False)
    assert pmfs == pytest.approx(expected, abs=1e-15)
    # The same as counts of unequal lengths: padded, then divided by (sum + 1e-6).
    counts = metrics.mmd2([np.array([2.0]), np.array([1.0, 1.0])], [np.array([0.0, 3.0])], metrics.gaussian_tv)
    assert counts == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kernel", [metrics.gaussian_tv, metrics.gaussian_emd, metrics.gaussian])
def test_vectorised_mmd_equals_the_double_loop(kernel):
    rng = np.random.default_rng(0)
    xs = [rng.random(int(rng.integers(3, 9))) for _ in range(7)]
    ys = [rng.random(8) for _ in range(5)]
    xs_pmf, ys_pmf = [x / x.sum() for x in xs], [y / y.sum() for y in ys]

    def mean_k(a, b):
        return np.mean([kernel(s, t, sigma=0.7) for s in a for t in b])

    loop = mean_k(xs_pmf, xs_pmf) + mean_k(ys_pmf, ys_pmf) - 2 * mean_k(xs_pmf, ys_pmf)
    assert metrics.mmd2(xs_pmf, ys_pmf, kernel, is_hist=False, sigma=0.7) == pytest.approx(loop, abs=1e-12)


def test_gaussian_emd_equals_an_explicit_emd():
    rng = np.random.default_rng(1)
    for _ in range(20):
        x, y = rng.random(int(rng.integers(2, 30))), rng.random(int(rng.integers(2, 30)))
        x, y = x / x.sum(), y / y.sum()
        scaling = float(rng.choice([1.0, 10.0]))
        emd = scipy.stats.wasserstein_distance(np.arange(len(x)), np.arange(len(y)), x, y) / scaling
        sigma = float(rng.uniform(0.1, 2.0))
        value = metrics.gaussian_emd(x, y, sigma=sigma, distance_scaling=scaling)
        assert value == pytest.approx(math.exp(-(emd**2) / (2 * sigma**2)), abs=1e-12)


def test_descriptors_of_small_graphs():
    k4 = nx.complete_graph(4)
    assert metrics.degree_histogram(k4).tolist() == [0, 0, 0, 4]
    assert metrics.clustering_histogram(k4)[-1] == 4 and metrics.clustering_histogram(nx.path_graph(4))[0] == 4
    # Normalised-Laplacian eigenvalues of K4: 0 once and 4/3 three times; bins of width (2 + 1e-5) / 200.
    spectrum = metrics.spectral_histogram(k4)
    assert spectrum.shape == (200,) and spectrum[0] == 0.25 and spectrum[133] == 0.75 and spectrum.sum() == 1.0


def test_empty_graphs_do_not_crash_and_are_left_out(mixed):
    empty = nx.Graph()
    assert metrics.degree_histogram(empty).tolist() == []
    assert metrics.orbit_counts(empty).shape == (0, 15) and metrics.orbit_feature(empty).tolist() == [0.0] * 15
    assert metrics.clustering_histogram(empty).sum() == 0 and metrics.spectral_histogram(empty).sum() == 0
    with_empty = metrics.graph_metrics(mixed, [*mixed[:3], empty], train=mixed, validity="planar")
    without = metrics.graph_metrics(mixed, mixed[:3])
    assert {k: with_empty[k] for k in MMD_KEYS} == without
    assert with_empty["valid"] == 0.5  # path, cycle valid; K5 and the empty graph not
    assert all(math.isnan(v) for v in metrics.graph_metrics(mixed, [empty]).values())


def test_process_pool_gives_the_same_numbers(mixed):
    generated = [nx.gnp_random_graph(12, 0.3, seed=s) for s in range(8)]
    assert metrics.graph_metrics(mixed, generated, n_jobs=2) == metrics.graph_metrics(mixed, generated, n_jobs=1)


def test_unknown_kernel_is_refused(mixed):
    with pytest.raises(ValueError, match="kernel"):
        metrics.mmd_degree(mixed, mixed, kernel="l2")


# --- orbits -----------------------------------------------------------------------------------------------------


KNOWN_ORBITS = {
    "K4": (nx.complete_graph(4), {v: {0: 3, 3: 3, 14: 1} for v in range(4)}),
    "path": (
        nx.path_graph(4),
        {0: {0: 1, 1: 1, 4: 1}, 1: {0: 2, 1: 1, 2: 1, 5: 1}, 2: {0: 2, 1: 1, 2: 1, 5: 1}, 3: {0: 1, 1: 1, 4: 1}},
    ),
    "star3": (nx.star_graph(3), {0: {0: 3, 2: 3, 7: 1}, **{v: {0: 1, 1: 2, 6: 1} for v in (1, 2, 3)}}),
    "star4": (nx.star_graph(4), {0: {0: 4, 2: 6, 7: 4}, **{v: {0: 1, 1: 3, 6: 3} for v in (1, 2, 3, 4)}}),
    "cycle": (nx.cycle_graph(4), {v: {0: 2, 1: 2, 2: 1, 8: 1} for v in range(4)}),
    "paw": (
        paw(),
        {
            0: {0: 3, 2: 2, 3: 1, 11: 1},
            1: {0: 2, 1: 1, 3: 1, 10: 1},
            2: {0: 2, 1: 1, 3: 1, 10: 1},
            3: {0: 1, 1: 2, 9: 1},
        },
    ),
    # networkx's diamond: nodes 1 and 2 have degree 3, nodes 0 and 3 degree 2.
    "diamond": (
        nx.diamond_graph(),
        {
            0: {0: 2, 1: 2, 3: 1, 12: 1},
            1: {0: 3, 2: 1, 3: 2, 13: 1},
            2: {0: 3, 2: 1, 3: 2, 13: 1},
            3: {0: 2, 1: 2, 3: 1, 12: 1},
        },
    ),
}


@pytest.mark.parametrize("name", KNOWN_ORBITS)
def test_orbit_counts_of_small_graphlets(name):
    g, expected = KNOWN_ORBITS[name]
    np.testing.assert_array_equal(metrics.orbit_counts(g), orbit_rows(expected))


def test_orbit_rows_follow_the_node_order_of_any_labels():
    g = nx.relabel_nodes(paw(), {0: "hub", 1: "a", 2: "b", 3: "tail"})
    counts = metrics.orbit_counts(g)
    assert list(g).index("tail") == 3 and counts[3, 9] == 1 and counts[0, 11] == 1
    np.testing.assert_allclose(metrics.orbit_feature(nx.complete_graph(4)), orbit_rows({0: {0: 3, 3: 3, 14: 1}})[0])


# Each template graphlet with the orbit of every one of its nodes, to classify subsets by isomorphism.
TEMPLATES = [
    (nx.path_graph(3), {0: 1, 1: 2, 2: 1}),
    (nx.complete_graph(3), {0: 3, 1: 3, 2: 3}),
    (nx.path_graph(4), {0: 4, 1: 5, 2: 5, 3: 4}),
    (nx.star_graph(3), {0: 7, 1: 6, 2: 6, 3: 6}),
    (nx.cycle_graph(4), {0: 8, 1: 8, 2: 8, 3: 8}),
    (paw(), {0: 11, 1: 10, 2: 10, 3: 9}),
    (nx.diamond_graph(), {0: 12, 1: 13, 2: 13, 3: 12}),
    (nx.complete_graph(4), {0: 14, 1: 14, 2: 14, 3: 14}),
]


def brute_force_orbits(g: nx.Graph) -> np.ndarray:
    index = {v: i for i, v in enumerate(g)}
    counts = np.zeros((len(index), 15), dtype=np.int64)
    for v, d in g.degree():
        counts[index[v], 0] = d
    for size in (3, 4):
        for subset in itertools.combinations(g, size):
            h = g.subgraph(subset)
            if not nx.is_connected(h):
                continue
            for template, orbit in TEMPLATES:
                matcher = nx.algorithms.isomorphism.GraphMatcher(h, template)
                if matcher.is_isomorphic():
                    for v, t in matcher.mapping.items():
                        counts[index[v], orbit[t]] += 1
                    break
    return counts


@pytest.mark.parametrize("n,p,seed", [(12, 0.35, 0), (10, 0.7, 1), (13, 0.2, 2)])
def test_orbit_counts_equal_a_brute_force_count(n, p, seed):
    g = nx.gnp_random_graph(n, p, seed=seed)
    g.add_node("isolated")
    np.testing.assert_array_equal(metrics.orbit_counts(g), brute_force_orbits(g))


# --- validity ---------------------------------------------------------------------------------------------------


def test_planar_validity():
    assert metrics.is_planar_valid(nx.grid_2d_graph(5, 5))
    assert not metrics.is_planar_valid(nx.complete_graph(5))
    assert not metrics.is_planar_valid(nx.disjoint_union(nx.cycle_graph(4), nx.path_graph(3)))
    assert not metrics.is_planar_valid(nx.Graph())


def test_sbm_samples_pass_and_erdos_renyi_of_equal_density_fails():
    samples = [sbm_sample(seed) for seed in range(12)]
    er = [nx.gnm_random_graph(g.number_of_nodes(), g.number_of_edges(), seed=i) for i, g in enumerate(samples)]
    # SPECTRE's test itself rejects some true samples (a block pair without edges has a Wald p-value near 0).
    assert sum(metrics.is_sbm_valid(g) for g in samples) >= 9
    assert not any(metrics.is_sbm_valid(g) for g in er)
    assert not any(metrics.is_sbm_valid(g, strict=False) for g in er)
    assert metrics.fraction_valid([samples[0], *samples[4:8]], "sbm") == 0.8  # seed 0 is one of those samples


def test_sbm_blocks_recover_the_planted_partition():
    for seed in range(6):
        g = sbm_sample(seed)
        labels = metrics.fit_blocks(g)
        found = {frozenset(np.flatnonzero(labels == b).tolist()) for b in range(labels.max() + 1)}
        assert found == {frozenset(block) for block in g.graph["partition"]}


# --- uniqueness, novelty, V.U.N. --------------------------------------------------------------------------------


def test_isomorphic_relabellings_are_duplicates():
    g = nx.gnp_random_graph(15, 0.3, seed=3)
    copies = [relabelled(g, s) for s in range(3)]
    assert metrics.fraction_unique(copies) == pytest.approx(1 / 3)
    assert metrics.fraction_novel(copies, train=[nx.path_graph(15), relabelled(g, 9)]) == 0.0
    assert metrics.fraction_novel(copies, train=[nx.path_graph(15)]) == 1.0


def test_vun_of_a_hand_built_list():
    cycle = nx.cycle_graph(5)
    generated = [cycle, relabelled(cycle, 0), nx.complete_graph(5), nx.path_graph(5), nx.cycle_graph(6), nx.Graph()]
    train = [relabelled(nx.path_graph(5), 1), nx.star_graph(4)]
    # valid: both 5-cycles, the path and the 6-cycle; unique: all but the second 5-cycle; novel: all but the path.
    assert metrics.fraction_valid(generated, "planar") == pytest.approx(4 / 6)
    assert metrics.fraction_unique(generated) == pytest.approx(5 / 6)
    assert metrics.fraction_novel(generated, train) == pytest.approx(5 / 6)
    assert metrics.vun(generated, train, metrics.is_planar_valid) == pytest.approx(2 / 6)
    result = metrics.graph_metrics(generated[:5], generated, train=train, validity="planar")
    assert (result["valid"], result["unique"], result["novel"], result["vun"]) == pytest.approx(
        (4 / 6, 5 / 6, 5 / 6, 2 / 6)
    )


def test_reference_metrics_are_train_against_reference(mixed):
    result = metrics.reference_metrics(mixed, mixed[::-1], validity="planar")
    assert set(result) == {*MMD_KEYS, "valid"} and all(result[k] == pytest.approx(0.0, abs=1e-12) for k in MMD_KEYS)
    assert result["valid"] == pytest.approx(5 / 6)  # all but K5
