"""Tests of the crystal metrics (domains/crystals/metrics.py): known answers of CDVAE's and DiffCSP's definitions.

Validity and coverage are checked on hand-built structures and fingerprints whose answers are known; generation
metrics, matching and the property regressor on a small slice of perov_5_dev (CDVAE's CSV format).
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure
from threadpoolctl import threadpool_limits

from archipelago.domains.crystals import metrics

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "crystals" / "perov_5_dev"
N_TEST = 32  # test-split crystals used by the data tests (~0.1 s of fingerprinting each)
N_TRAIN = 200  # training rows of the property regressor


def read_split(split: str, n: int) -> pd.DataFrame:
    if not DATA.is_dir():
        pytest.skip(f"perov_5_dev data not found at {DATA}")
    frame = pd.read_csv(DATA / f"{split}.csv").head(n)
    return frame.assign(structure=[Structure.from_str(cif, fmt="cif") for cif in frame["cif"]])


@pytest.fixture(scope="module")
def test_set() -> list[Structure]:
    return list(read_split("test", N_TEST)["structure"])


@pytest.fixture(scope="module")
def test_fps(test_set) -> metrics.Fingerprints:
    return metrics.fingerprints(test_set, workers=1, progress=False)


@pytest.fixture(scope="module")
def valid_index(test_set, test_fps) -> np.ndarray:
    """Test crystals valid in CDVAE's sense (structure, SMACT composition, fingerprint)."""
    ok = [metrics.structure_valid(s) and metrics.composition_valid(s) for s in test_set]
    return np.flatnonzero(np.array(ok) & ~test_fps.failed)


def pair(distance: float, edge: float = 5.0) -> Structure:
    """Two atoms `distance` A apart along x in a cubic cell (their periodic images are much further)."""
    return Structure(Lattice.cubic(edge), ["Na", "Cl"], [[0, 0, 0], [distance / edge, 0, 0]])


def rock_salt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def strained(structure: Structure, factors) -> Structure:
    """The same fractional coordinates in a lattice whose vectors are scaled by `factors`."""
    return Structure(Lattice(structure.lattice.matrix * np.asarray(factors)[:, None]), structure.species,
                     structure.frac_coords)


# --- validity ------------------------------------------------------------------------------------------------------


def test_atoms_closer_than_half_an_angstrom_make_a_structure_invalid():
    assert not metrics.structure_valid(pair(0.3))
    assert metrics.structure_valid(pair(0.6))


def test_a_periodic_image_closer_than_the_cutoff_counts():
    # At x = 0.1 and 4.7 A in a 5 A cell: 4.6 A apart inside the cell, 0.4 A apart through its boundary.
    assert not metrics.structure_valid(Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0.02, 0, 0], [0.94, 0, 0]]))


def test_cell_volume_below_a_tenth_of_a_cubic_angstrom_is_invalid():
    assert not metrics.structure_valid(Structure(Lattice.cubic(0.4), ["Fe"], [[0, 0, 0]]))  # 0.064 A^3
    assert metrics.structure_valid(Structure(Lattice.cubic(2.9), ["Fe"], [[0, 0, 0]]))  # one atom: no pairs


@pytest.mark.parametrize(
    ("elements", "counts", "valid"),
    [
        (["Na", "Cl"], [1, 1], True),
        (["Na", "Cl"], [4, 4], True),  # reduced by the gcd
        (["Na", "Cl"], [1, 3], False),  # no oxidation states of Na and Cl balance NaCl3
        (["Na", "Cl"], [2, 6], False),
        (["Ba", "Ti", "O"], [1, 1, 3], True),
        (["O"], [4], True),  # one element
        (["Fe", "Ni"], [1, 3], True),  # all metals: an alloy
        ([11, 17], [1, 1], True),  # atomic numbers
    ],
)
def test_smact_composition_validity(elements, counts, valid):
    assert metrics.composition_valid((elements, counts)) is valid


def test_composition_validity_of_a_structure_counts_its_sites():
    assert len(rock_salt()) == 8
    assert metrics.composition_valid(rock_salt())
    assert not metrics.composition_valid(Structure(Lattice.cubic(6.0), ["Na", "Cl", "Cl", "Cl"],
                                                   [[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]]))


def test_smact_test_reproduces_the_smact_2_answers_behind_the_published_numbers():
    # Pm has no Pauling electronegativity: smact 2 raised TypeError on the Pm-O comparison, which CDVAE read as a
    # pass; smact 4's pauling_test says False.
    assert metrics.composition_valid((["Pm", "O"], [2, 3]))
    # smact < 2.6 read Zr's electronegativity as 0.33, so a Zr cation passes against a Na anion.
    assert metrics.composition_valid((["Zr", "H", "Na"], [1, 1, 1]))


# --- fingerprints --------------------------------------------------------------------------------------------------


def test_fingerprints_have_one_row_per_crystal_and_mark_missing_structures(test_set, test_fps):
    fps = metrics.fingerprints([test_set[0], None], workers=1, progress=False)
    assert fps.structure.shape == (2, 61) and fps.composition.shape == (2, 132)
    assert fps.failed.tolist() == [False, True]
    np.testing.assert_array_equal(fps.structure[0], test_fps.structure[0])
    assert np.isnan(fps.structure[1]).all() and np.isnan(fps.composition[1]).all()


def failing_crystal_nn(monkeypatch) -> None:
    """Make CrystalNN raise on every site, in this process (use workers=1)."""

    class Raising:
        def featurize(self, structure, i):
            raise ValueError("no Voronoi neighbours")

        def feature_labels(self):
            return [f"f{i}" for i in range(61)]

    _, magpie = metrics._featurizers()
    monkeypatch.setattr(metrics, "_featurizers", lambda: (Raising(), magpie))


def test_a_crystalnn_failure_gives_no_structure_fingerprint(monkeypatch, test_set):
    failing_crystal_nn(monkeypatch)
    assert metrics.structure_fingerprint(test_set[0]) is None
    assert metrics.fingerprints(test_set[:1], workers=1, progress=False).failed.tolist() == [True]


def test_two_workers_give_the_same_numbers_as_one(test_set, test_fps):
    fps = metrics.fingerprints(test_set[:12], workers=2, progress=False)
    np.testing.assert_array_equal(fps.structure, test_fps.structure[:12])
    np.testing.assert_array_equal(fps.composition, test_fps.composition[:12])
    np.testing.assert_array_equal(fps.failed, test_fps.failed[:12])


def test_the_reference_cache_is_read_back_without_recomputing(tmp_path, monkeypatch, test_set, test_fps):
    first = metrics.cached_fingerprints(test_set[:4], tmp_path, workers=1, progress=False)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob("*.tmp"))

    def recompute(*args, **kwargs):
        raise AssertionError("fingerprints recomputed despite the cache")

    monkeypatch.setattr(metrics, "fingerprints", recompute)
    second = metrics.cached_fingerprints(test_set[:4], tmp_path)
    for name in ("structure", "composition", "failed"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))
    np.testing.assert_array_equal(second.structure, test_fps.structure[:4])


def test_the_cache_key_changes_with_the_structures(test_set):
    key = metrics.fingerprint_key(test_set[:4])
    assert metrics.fingerprint_key(test_set[:4]) == key
    assert metrics.fingerprint_key(test_set[:3]) != key
    moved = test_set[3].copy()
    moved.translate_sites([0], [0.01, 0, 0])
    assert metrics.fingerprint_key([*test_set[:3], moved]) != key


def test_compositions_are_scaled_with_cdvae_constants():
    means, stds = metrics._magpie_scaler()
    assert means.shape == stds.shape == (132,)
    raw = np.stack([means, means + 2 * stds, np.full(132, np.nan)])
    np.testing.assert_allclose(metrics.scaled_composition(raw), [np.zeros(132), np.full(132, 2.0), np.zeros(132)])


# --- coverage and EMDs ---------------------------------------------------------------------------------------------


def synthetic(struct_ids, comp_ids, failed=None) -> metrics.Fingerprints:
    """Crystals whose structure fingerprint is point `struct_ids[i]` and composition point `comp_ids[i]`: distinct
    points are 1 apart in structure (cutoff 0.2) and 10 apart in scaled composition (cutoff 4)."""
    means, stds = metrics._magpie_scaler()
    structure = np.eye(61)[struct_ids] / np.sqrt(2)
    composition = means + stds * 10 / np.sqrt(2) * np.eye(132)[comp_ids]
    failed = np.zeros(len(struct_ids), dtype=bool) if failed is None else np.asarray(failed)
    return metrics.Fingerprints(structure, composition, failed)


def test_a_generated_set_covering_half_the_reference_has_recall_one_half():
    reference = synthetic(range(10), range(10))
    generated = synthetic(range(5), range(5))
    assert metrics.coverage(generated, reference, 0.2, 4.0) == {"cov_recall": 0.5, "cov_precision": 1.0}


def test_recall_takes_structure_and_composition_minima_over_different_crystals():
    # Neither generated crystal matches a reference crystal in both fingerprints, yet CDVAE counts both covered.
    reference = synthetic(range(10), range(10))
    generated = synthetic([0, 1], [1, 0])
    assert metrics.coverage(generated, reference, 0.2, 4.0) == {"cov_recall": 0.2, "cov_precision": 1.0}


def test_precision_divides_by_every_generated_crystal_including_failed_fingerprints():
    reference = synthetic(range(10), range(10))
    generated = synthetic(range(8), range(8), failed=[False] * 4 + [True] * 4)
    assert metrics.coverage(generated, reference, 0.2, 4.0) == {"cov_recall": 0.4, "cov_precision": 0.5}
    assert metrics.coverage(generated, reference, 0.2, 4.0, num_generated=4)["cov_precision"] == 1.0


def test_emds_of_known_distributions():
    salt = rock_salt()
    assert metrics.density_emd([salt], [salt]) == 0.0
    doubled = strained(salt, [2.0, 1.0, 1.0])  # twice the volume, half the density
    assert metrics.density_emd([doubled], [salt]) == pytest.approx(salt.density / 2)
    iron = Structure(Lattice.cubic(2.9), ["Fe"], [[0, 0, 0]])
    assert metrics.element_count_emd([iron, iron], [salt, salt]) == 1.0


def test_the_test_set_against_itself(test_set, test_fps, valid_index):
    index = valid_index[:16]
    reference = [test_set[i] for i in index]
    n = len(reference)
    got = metrics.generation_metrics([*reference, None], reference, reference_fps=test_fps.take(index), workers=1,
                                     progress=False)
    # The None entry is invalid in every sense and counts in COV-P's denominator; the EMDs take only valid crystals.
    assert got == pytest.approx({"valid_structure": n / (n + 1), "valid_composition": n / (n + 1), "valid": n / (n + 1),
                                 "cov_recall": 1.0, "cov_precision": n / (n + 1), "emd_density": 0.0,
                                 "emd_elements": 0.0, "emd_count": n})


def test_the_emds_draw_n_valid_crystals_with_the_seed(test_set, test_fps):
    reference = test_set[:8]
    runs = [metrics.generation_metrics(reference, reference, n_valid=4, seed=seed, reference_fps=test_fps.take(
        np.arange(8)), workers=1, progress=False) for seed in (3, 3)]
    assert runs[0] == runs[1]
    assert runs[0]["emd_count"] == 4


# --- structure prediction ------------------------------------------------------------------------------------------


def test_structures_match_themselves_with_zero_rmse(test_set, valid_index):
    crystals = [test_set[i] for i in valid_index[:8]]
    got = metrics.match_rate_rmse(crystals, crystals, workers=1, progress=False)
    assert got["match_rate"] == 1.0 and got["rmse"] < 1e-8


def test_a_lattice_strained_within_ltol_still_matches(test_set, valid_index):
    rng = np.random.default_rng(0)
    truth = [test_set[i] for i in valid_index[:4]]
    predicted = [strained(s, rng.uniform(0.99, 1.01, size=3)) for s in truth]
    got = metrics.match_rate_rmse(predicted, truth, workers=1, progress=False)
    assert got["match_rate"] == 1.0 and 0 < got["rmse"] < 0.05


def test_a_lattice_strained_beyond_ltol_does_not_match(test_set, valid_index):
    rng = np.random.default_rng(0)
    truth = [test_set[i] for i in valid_index[:4]]
    predicted = []
    for s in truth:
        stretch = rng.uniform(1.8, 2.2)  # volume kept, lengths off by far more than ltol = 0.3
        predicted.append(strained(s, [stretch, 1.0, 1.0 / stretch]))
    got = metrics.match_rate_rmse(predicted, truth, workers=1, progress=False)
    assert got["match_rate"] == 0.0 and math.isnan(got["rmse"])


def test_a_failed_fingerprint_blocks_a_match_unless_the_check_is_off(monkeypatch, test_set, valid_index):
    crystals = [test_set[i] for i in valid_index[:2]]
    failing_crystal_nn(monkeypatch)
    assert metrics.match_rate_rmse(crystals, crystals, workers=1, progress=False)["match_rate"] == 0.0
    off = metrics.match_rate_rmse(crystals, crystals, workers=1, progress=False, check_fingerprint=False)
    assert off["match_rate"] == 1.0


def test_a_missing_prediction_counts_as_unmatched(test_set, valid_index):
    truth = [test_set[i] for i in valid_index[:4]]
    assert metrics.match_rate_rmse([None, *truth[1:]], truth, workers=1, progress=False)["match_rate"] == 0.75


def test_an_invalid_ground_truth_is_never_matched_as_in_diffcsp(test_set):
    invalid = [s for s in test_set if not metrics.composition_valid(s)]
    if not invalid:
        pytest.skip("no SMACT-invalid composition in this slice")
    assert metrics.match_rate_rmse(invalid[:1], invalid[:1], workers=1, progress=False)["match_rate"] == 0.0


# --- property conditioning -----------------------------------------------------------------------------------------


def test_the_property_regressor_measures_the_training_property():
    rows = read_split("train", N_TRAIN)
    structures, values = list(rows["structure"]), rows["heat_ref"].to_numpy()
    fps = metrics.fingerprints(structures, workers=2, progress=False)
    # One OpenMP thread: on two shared CI cores, sklearn's spinning threads can take 30 s for what one does in 1 s.
    with threadpool_limits(1):
        regressor = metrics.PropertyRegressor.fit(structures, values, seed=0, fps=fps)
    report = regressor.report()
    assert set(report) == {"test_mae", "test_r2", "n_train", "n_test"}
    assert np.isfinite(regressor.test_mae) and np.isfinite(regressor.test_r2)
    assert report["n_train"] == N_TRAIN and report["n_test"] == N_TRAIN // 5

    with threadpool_limits(1):
        predicted = regressor.predict([*structures[:3], None], workers=1)
        got = metrics.property_metrics(structures[:40], values[:40], regressor, fps=fps.take(np.arange(40)))
    assert np.isfinite(predicted[:3]).all() and np.isnan(predicted[3])  # None: no prediction
    assert got["n_predicted"] == 40
    assert got["mae"] < regressor.test_mae  # in-sample error of the final fit, on all rows
    assert got["within_test_mae"] > 0.5
    assert got["mean"] == pytest.approx(values[:40].mean(), abs=regressor.test_mae)
