"""Crystal-generation and structure-prediction metrics of CDVAE (Xie et al., ICLR 2022) and DiffCSP (Jiao et al.,
NeurIPS 2023), computed as their evaluation code defines them, on pymatgen `Structure`s.

Matched definitions (CDVAE `scripts/eval_utils.py`, `scripts/compute_metrics.py`, `cdvae/common/constants.py`;
DiffCSP `scripts/eval_utils.py`, `scripts/compute_metrics.py`):

- Structure validity: every periodic pairwise distance >= 0.5 A and cell volume >= 0.1 A^3.
- Composition validity: SMACT charge neutrality plus the Pauling electronegativity test; one element or all metals is
  valid. It runs on smact >= 3 and gives the answers of the smact 2.x behind the published numbers: the 2014
  oxidation-state set, Zr's old electronegativity, and smact 2's handling of unknown electronegativities (see
  `_smact_valid`, `_pauling_ok`). As DiffCSP, more than 10^7 oxidation-state combinations count as invalid.
- Coverage: structure fingerprint = mean over sites of matminer's CrystalNN "ops" site fingerprint; composition
  fingerprint = matminer's Magpie `ElementProperty`, standardized with CDVAE's fixed scaler (`magpie_scaler.json`, NaN
  -> 0). COV-R: fraction of reference crystals whose nearest generated structure fingerprint AND nearest generated
  composition fingerprint (two separate minima, possibly two different crystals) are within the cutoffs. COV-P: the
  number of generated crystals within both cutoffs of the reference set, divided by the number of generated crystals
  before the ones whose fingerprint failed are dropped. Every generated crystal enters coverage, valid or not.
- EMD: scipy's 1-D Wasserstein distance of density and of the number of distinct elements between valid generated
  crystals (a random draw of `n_valid`) and the whole reference set.
- Match rate / RMSE: pymatgen `StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)`, `get_rms_dist(pred, gt)[0]`.

A crystal is *valid* (CDVAE's `Crystal.valid`) when its structure and composition are valid and its CrystalNN
fingerprint could be computed. All rates are fractions in [0, 1], not percentages. Departures from the published code
are named where they happen: fewer than `n_valid` valid crystals use all of them (CDVAE raises), and reference crystals
whose fingerprint fails are left out of coverage (CDVAE crashes on them).

`PropertyRegressor` is our own stand-in for CDVAE's property-prediction networks: a gradient-boosted regressor on
composition, lattice and CrystalNN features that measures a property of generated crystals for conditioning metrics.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import smact
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Element, Structure
from scipy.spatial.distance import cdist
from scipy.stats import wasserstein_distance
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.metrics import mean_absolute_error, r2_score
from smact.screening import pauling_test
from tqdm.auto import tqdm

Crystal = Structure | None  # None: a generated sample that could not be built into a structure (invalid in every sense)

# (structure cutoff, composition cutoff) per data set: CDVAE's COV_Cutoffs.
COVERAGE_CUTOFFS: dict[str, tuple[float, float]] = {
    "perov_5": (0.2, 4.0),
    "carbon_24": (0.2, 4.0),
    "mp_20": (0.4, 10.0),
}
MATCHER = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)  # CDVAE's and DiffCSP's RecEval
MAX_OXIDATION_COMBINATIONS = 10**7  # DiffCSP's cap: compositions with more combinations are invalid (CDVAE: none)
# Every smact release before 2.6 (July 2024), so every published CDVAE / DiffCSP number, read Zr's Pauling
# electronegativity as 0.33 (a typo since corrected to 1.33); kept so the SMACT test gives the published answers.
PUBLISHED_PAULING = {"Zr": 0.33}
_DIST_ROWS = 2048  # generated rows per block of the coverage distance matrices (bounds memory to ~rows x reference)


# --- validity ------------------------------------------------------------------------------------------------------


def structure_valid(structure: Structure, cutoff: float = 0.5, min_volume: float = 0.1) -> bool:
    """CDVAE's `structure_validity`: all periodic distances between distinct sites >= `cutoff` A, volume >=
    `min_volume` A^3. A one-atom cell has no pairs, so only its volume counts. A NaN volume is invalid (as DiffCSP)."""
    if not structure.volume >= min_volume:
        return False
    if len(structure) < 2:
        return True
    distances = structure.distance_matrix  # [n, n] shortest periodic distances
    np.fill_diagonal(distances, np.inf)
    return bool(distances.min() >= cutoff)


def composition_valid(crystal: Structure | tuple[Sequence[str | int], Sequence[int]]) -> bool:
    """CDVAE's `smact_validity` on a structure or on (elements, counts): elements as symbols or atomic numbers,
    counts reduced by their gcd before the test. Cached per reduced composition."""
    symbols, counts = _reduced_composition(crystal)
    return _smact_valid(symbols, counts)


def _reduced_composition(crystal: Structure | tuple[Sequence[str | int], Sequence[int]]) -> tuple[tuple, tuple]:
    """(symbols, counts) sorted by atomic number, counts divided by their gcd (CDVAE's `Crystal.get_composition`)."""
    if isinstance(crystal, Structure):
        tally = Counter(crystal.atomic_numbers)
    else:
        elements, counts = crystal
        tally = Counter()
        for element, count in zip(elements, counts, strict=True):
            tally[Element(element).Z if isinstance(element, str) else int(element)] += int(count)
    numbers = sorted(tally)
    divisor = math.gcd(*(tally[z] for z in numbers))
    return tuple(Element.from_Z(z).symbol for z in numbers), tuple(tally[z] // divisor for z in numbers)


@functools.cache
def _smact_valid(symbols: tuple[str, ...], counts: tuple[int, ...]) -> bool:
    if len(symbols) == 1:
        return True
    if all(symbol in smact.metals for symbol in symbols):  # include_alloys
        return True
    try:
        elements = smact.element_dictionary(symbols)
    except KeyError:  # no SMACT data (Z > 103): no oxidation states to balance
        return False
    # smact >= 3 made the ICSD-24 set the default `oxidation_states`; smact 2.x (CDVAE pins 2.2.1) used the 2014 set.
    states = [elements[s].oxidation_states_smact14 or () for s in symbols]
    if math.prod(len(s) for s in states) > MAX_OXIDATION_COMBINATIONS:
        return False
    electronegativities = [PUBLISHED_PAULING.get(s, elements[s].pauling_eneg) for s in symbols]
    for oxidation in itertools.product(*states):
        if _charge_neutral(oxidation, counts) and _pauling_ok(oxidation, electronegativities):
            return True
    return False


def _charge_neutral(oxidation: Sequence[int], counts: Sequence[int]) -> bool:
    """Whether these oxidation states balance in exactly these counts (CDVAE: stoichs = one ratio per site)."""
    ratios = smact.neutral_ratios(oxidation, stoichs=[(count,) for count in counts], threshold=max(counts))
    # smact < 4 returns (exists, ratios); smact 4 returns the list of ratios.
    return bool(ratios[0]) if isinstance(ratios, tuple) else bool(ratios)


def _pauling_ok(oxidation: Sequence[int], electronegativities: Sequence[float | None]) -> bool:
    """The Pauling test as CDVAE saw it. With every electronegativity known, smact's `pauling_test`. Otherwise smact
    2.x compared None with a number, which raised TypeError for a cation-anion pair (CDVAE then passes the test) and
    returned False for a same-sign pair; smact >= 3 returns False for both, so the smact 2.x walk is replayed here."""
    if all(e is not None for e in electronegativities):
        return pauling_test(oxidation, electronegativities)
    for (ox1, e1), (ox2, e2) in itertools.combinations(zip(oxidation, electronegativities, strict=True), 2):
        opposite = (ox1 > 0 and ox2 < 0) or (ox1 < 0 and ox2 > 0)
        if opposite and (e1 is None or e2 is None):
            return True
        if opposite and (e1 >= e2 if ox1 > 0 else e1 <= e2):
            return False
        if e1 is None or e2 is None:
            return False
    return True


# --- fingerprints --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprints:
    """Fingerprints of a set of crystals, one row per crystal, in input order."""

    structure: np.ndarray  # [n, 61] CrystalNN "ops" site fingerprints averaged over sites; NaN rows where `failed`
    composition: np.ndarray  # [n, 132] Magpie ElementProperty, unscaled; NaN rows for absent structures
    failed: np.ndarray  # [n] bool: no structure, or CrystalNN raised (CDVAE's struct_fp is None)

    def __len__(self) -> int:
        return len(self.failed)

    def take(self, index: np.ndarray) -> Fingerprints:
        return Fingerprints(self.structure[index], self.composition[index], self.failed[index])


@functools.lru_cache(maxsize=1)
def _featurizers() -> tuple[Any, Any]:
    """(CrystalNNFingerprint "ops", ElementProperty "magpie"), built once per process (matminer imports slowly)."""
    from matminer.featurizers.composition.composite import ElementProperty
    from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

    return CrystalNNFingerprint.from_preset("ops"), ElementProperty.from_preset("magpie")


def structure_fingerprint(structure: Structure) -> np.ndarray | None:
    """Mean over sites of the CrystalNN "ops" site fingerprint; None when CrystalNN raises (CDVAE: not covered)."""
    crystal_nn, _ = _featurizers()
    if len(structure) == 0:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no oxidation states", "cannot locate radius": once per site
            sites = [crystal_nn.featurize(structure, i) for i in range(len(structure))]
    except Exception:
        return None
    return np.asarray(sites, dtype=np.float64).mean(axis=0)


def composition_fingerprint(structure: Structure) -> np.ndarray:
    """Magpie `ElementProperty` of the structure's composition, unscaled (NaN where Magpie lacks an element's data)."""
    _, magpie = _featurizers()
    composition = Composition(Counter(structure.atomic_numbers))  # CDVAE: Composition(Counter(atom_types))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(magpie.featurize(composition), dtype=np.float64)


def _fingerprint_one(structure: Crystal) -> tuple[np.ndarray | None, np.ndarray | None]:
    if structure is None:
        return None, None
    return structure_fingerprint(structure), composition_fingerprint(structure)


def _stack(rows: Sequence[np.ndarray | None], width: int) -> np.ndarray:
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        if row is not None:
            out[i] = row
    return out


def _as_fingerprints(pairs: Sequence[tuple[np.ndarray | None, np.ndarray | None]]) -> Fingerprints:
    crystal_nn, magpie = _featurizers()
    structure = _stack([s for s, _ in pairs], len(crystal_nn.feature_labels()))
    composition = _stack([c for _, c in pairs], len(magpie.feature_labels()))
    return Fingerprints(structure, composition, np.array([s is None for s, _ in pairs], dtype=bool))


def fingerprints(structures: Sequence[Crystal], workers: int | None = None, progress: bool = True) -> Fingerprints:
    """Structure and composition fingerprints of every crystal, over `workers` processes (None: all cores; 1: this
    process, no pool), with a progress bar on stderr."""
    _featurizers()  # built before the pool starts, so that forked workers inherit them instead of importing matminer
    return _as_fingerprints(_parallel_map(_fingerprint_one, structures, workers, progress, "fingerprints"))


def cached_fingerprints(
    structures: Sequence[Structure], cache_dir: str | os.PathLike, workers: int | None = None, progress: bool = True
) -> Fingerprints:
    """`fingerprints` of a reference set, read from `cache_dir` when a file for exactly these structures (and this
    matminer / pymatgen) is there, else computed and written there atomically."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"fingerprints-{fingerprint_key(structures)[:32]}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as saved:
            return Fingerprints(saved["structure"], saved["composition"], saved["failed"])
    fps = fingerprints(structures, workers=workers, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=path.stem, suffix=".tmp", delete=False) as handle:
        try:
            np.savez(handle, structure=fps.structure, composition=fps.composition, failed=fps.failed)
        except BaseException:
            os.unlink(handle.name)
            raise
    os.replace(handle.name, path)  # readers see no file or the whole file, never a partial one
    return fps


def fingerprint_key(structures: Sequence[Structure]) -> str:
    """sha256 over every structure's lattice, species and fractional coordinates, and the featurizers' versions."""
    digest = hashlib.sha256(f"matminer {version('matminer')} pymatgen {version('pymatgen')}".encode())
    for structure in structures:
        digest.update(np.ascontiguousarray(structure.lattice.matrix, dtype=np.float64).tobytes())
        digest.update(" ".join(str(s) for s in structure.species).encode())
        digest.update(np.ascontiguousarray(structure.frac_coords, dtype=np.float64).tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _magpie_scaler() -> tuple[np.ndarray, np.ndarray]:
    scaler = json.loads(Path(__file__).with_name("magpie_scaler.json").read_text())
    return np.asarray(scaler["means"], dtype=np.float64), np.asarray(scaler["stds"], dtype=np.float64)


def scaled_composition(composition: np.ndarray) -> np.ndarray:
    """CDVAE's CompScaler: (x - means) / stds with its fixed constants, NaN replaced by 0."""
    means, stds = _magpie_scaler()
    scaled = (composition - means) / stds
    return np.where(np.isnan(scaled), 0.0, scaled)


def _parallel_map(fn: Callable, items: Sequence, workers: int | None, progress: bool, desc: str) -> list:
    """[fn(x) for x in items] over a process pool in chunks, in order, with a tqdm bar on stderr."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    results = []
    with tqdm(total=len(items), desc=desc, unit="crystal", disable=not progress, file=sys.stderr) as bar:
        if workers <= 1 or len(items) < 2:
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        workers = min(workers, len(items))
        with ProcessPoolExecutor(workers) as pool:
            for result in pool.map(fn, items, chunksize=max(1, len(items) // (4 * workers))):
                results.append(result)
                bar.update()
    return results


# --- generation metrics --------------------------------------------------------------------------------------------


def coverage(
    generated: Fingerprints,
    reference: Fingerprints,
    struct_cutoff: float,
    comp_cutoff: float,
    num_generated: int | None = None,
) -> dict[str, float]:
    """CDVAE's `compute_cov`: {"cov_recall", "cov_precision"} as fractions.

    Generated crystals whose fingerprint failed are dropped but still count in COV-P's denominator (`num_generated`,
    default: all of `generated`). Reference crystals whose fingerprint failed are left out (CDVAE's code would crash).
    """
    num_generated = len(generated) if num_generated is None else num_generated
    gen, ref = generated.take(~generated.failed), reference.take(~reference.failed)
    if len(ref) < len(reference):
        warnings.warn(f"{len(reference) - len(ref)} reference crystals have no fingerprint; left out of coverage",
                      stacklevel=2)
    if len(gen) == 0 or len(ref) == 0:
        return {"cov_recall": 0.0, "cov_precision": 0.0}
    gen_comp, ref_comp = scaled_composition(gen.composition), scaled_composition(ref.composition)
    recall_struct, recall_comp = np.full(len(ref), np.inf), np.full(len(ref), np.inf)
    precise = 0
    for start in range(0, len(gen), _DIST_ROWS):
        rows = slice(start, start + _DIST_ROWS)
        struct_d = cdist(gen.structure[rows], ref.structure)  # [rows, n_ref]
        comp_d = cdist(gen_comp[rows], ref_comp)  # [rows, n_ref]
        recall_struct = np.minimum(recall_struct, struct_d.min(axis=0))
        recall_comp = np.minimum(recall_comp, comp_d.min(axis=0))
        precise += int(np.sum((struct_d.min(axis=1) <= struct_cutoff) & (comp_d.min(axis=1) <= comp_cutoff)))
    recall = np.mean((recall_struct <= struct_cutoff) & (recall_comp <= comp_cutoff))
    return {"cov_recall": float(recall), "cov_precision": precise / num_generated}


def density_emd(generated: Sequence[Structure], reference: Sequence[Structure]) -> float:
    """CDVAE's `get_density_wdist`: Wasserstein distance of densities (g/cm^3)."""
    return float(wasserstein_distance([float(s.density) for s in generated], [float(s.density) for s in reference]))


def element_count_emd(generated: Sequence[Structure], reference: Sequence[Structure]) -> float:
    """CDVAE's `get_num_elem_wdist`: Wasserstein distance of the numbers of distinct elements."""
    counts = [[len(set(s.species)) for s in crystals] for crystals in (generated, reference)]
    return float(wasserstein_distance(*counts))


def _validity_one(structure: Crystal) -> tuple[bool, bool]:
    if structure is None:
        return False, False
    return structure_valid(structure), composition_valid(structure)


def generation_metrics(
    generated: Sequence[Crystal],
    reference: Sequence[Structure],
    dataset: str = "perov_5",
    n_valid: int = 1000,
    seed: int = 0,
    reference_fps: Fingerprints | None = None,
    workers: int | None = None,
    progress: bool = True,
    generated_fps: Fingerprints | None = None,
) -> dict[str, float | int]:
    """CDVAE's GenEval (also DiffCSP's): validity, COV-R / COV-P and the two EMDs; rates are fractions in [0, 1].

    Keys: valid_structure, valid_composition, valid (both, and a computable fingerprint, as CDVAE's `Crystal.valid`),
    cov_recall, cov_precision, emd_density, emd_elements, and emd_count, the number of valid crystals in the EMDs.
    The EMDs use `n_valid` valid crystals drawn without replacement with `seed`; with fewer valid crystals they use all
    of them (CDVAE raises instead). Coverage takes every generated crystal, valid or not, as CDVAE's `get_coverage`
    passes `self.crys`, not the valid samples; a None entry counts as a failed fingerprint. `reference_fps` and
    `generated_fps`: the two sets' fingerprints (e.g. from `cached_fingerprints`), computed here when None.
    """
    if dataset not in COVERAGE_CUTOFFS:
        raise ValueError(f"dataset must be one of {sorted(COVERAGE_CUTOFFS)} (coverage cutoffs), got {dataset!r}")
    validity = np.array(_parallel_map(_validity_one, generated, workers, progress, "validity"), dtype=bool)
    validity = validity.reshape(len(generated), 2)
    gen_fps = fingerprints(generated, workers=workers, progress=progress) if generated_fps is None else generated_fps
    if reference_fps is None:
        reference_fps = fingerprints(reference, workers=workers, progress=progress)
    if len(reference_fps) != len(reference):
        raise ValueError(f"reference_fps has {len(reference_fps)} rows for {len(reference)} reference crystals")
    valid = validity[:, 0] & validity[:, 1] & ~gen_fps.failed  # CDVAE: a failed fingerprint makes a crystal invalid
    chosen = np.flatnonzero(valid)
    if len(chosen) > n_valid:
        chosen = np.random.default_rng(seed).choice(chosen, size=n_valid, replace=False)
    sample = [generated[i] for i in chosen]
    return {
        "valid_structure": float(validity[:, 0].mean()),
        "valid_composition": float(validity[:, 1].mean()),
        "valid": float(valid.mean()),
        **coverage(gen_fps, reference_fps, *COVERAGE_CUTOFFS[dataset]),
        "emd_density": density_emd(sample, reference) if sample else math.nan,
        "emd_elements": element_count_emd(sample, reference) if sample else math.nan,
        "emd_count": len(sample),
    }


# --- structure prediction ------------------------------------------------------------------------------------------


def crystal_valid(structure: Crystal, check_fingerprint: bool = True) -> bool:
    """CDVAE's `Crystal.valid`: structure and composition valid, and (`check_fingerprint`) the CrystalNN fingerprint
    computable."""
    return (
        structure is not None
        and structure_valid(structure)
        and composition_valid(structure)
        and (not check_fingerprint or structure_fingerprint(structure) is not None)
    )


def _rms_one(pair: tuple[Crystal, Structure], check_fingerprint: bool = True) -> float | None:
    """DiffCSP's `process_one`: the RMS distance, or None when either crystal is invalid or nothing matches."""
    predicted, truth = pair
    if not (crystal_valid(predicted, check_fingerprint) and crystal_valid(truth, check_fingerprint)):
        return None
    try:
        rms = MATCHER.get_rms_dist(predicted, truth)
    except Exception:
        return None
    return None if rms is None else float(rms[0])


def match_rate_rmse(
    predicted: Sequence[Crystal],
    truth: Sequence[Structure],
    workers: int | None = None,
    progress: bool = True,
    check_fingerprint: bool = True,
) -> dict[str, float]:
    """DiffCSP's RecEval: {"match_rate", "rmse"}.

    A pair is tried only when both the prediction and the ground truth are valid (`crystal_valid`), as DiffCSP
    requires `c1.valid and c2.valid` (CDVAE's RecEval checks only the prediction). match_rate = matched /
    len(predicted); rmse = mean `get_rms_dist(pred, gt)[0]` over matched pairs, NaN when none matched.
    The CrystalNN part of that validity costs ~60x the matching itself; `check_fingerprint=False` skips it, which
    departs from DiffCSP only for a crystal whose fingerprint raises.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} ground-truth crystals")
    _featurizers()  # built before the pool starts, so that forked workers inherit them
    rms_one = functools.partial(_rms_one, check_fingerprint=check_fingerprint)
    rms = _parallel_map(rms_one, list(zip(predicted, truth, strict=True)), workers, progress, "matching")
    matched = [r for r in rms if r is not None]
    return {
        "match_rate": len(matched) / len(predicted) if predicted else 0.0,
        "rmse": float(np.mean(matched)) if matched else math.nan,
    }


# --- property conditioning -----------------------------------------------------------------------------------------


def _lattice_features(structure: Structure) -> np.ndarray:
    """[8]: volume per atom, density, sorted lattice lengths, sorted lattice angles."""
    lattice = structure.lattice
    return np.array(
        [lattice.volume / len(structure), float(structure.density), *sorted(lattice.abc), *sorted(lattice.angles)]
    )


def property_features(structures: Sequence[Crystal], fps: Fingerprints) -> np.ndarray:
    """[n, 132 + 8 + 61]: unscaled Magpie, lattice features and CrystalNN fingerprint; NaN rows where `fps.failed`."""
    lattice = _stack([None if s is None else _lattice_features(s) for s in structures], 8)
    features = np.concatenate([fps.composition, lattice, fps.structure], axis=1)
    features[fps.failed] = np.nan
    return features


@dataclass(frozen=True)
class PropertyRegressor:
    """A property of crystals predicted from their features, to measure that property on generated crystals.

    The model is sklearn's HistGradientBoostingRegressor: fast on CPU for thousands of rows of a few hundred
    features, needs no feature scaling, and takes the NaN that Magpie gives for elements without data.
    """

    model: HistGradientBoostingRegressor
    test_mae: float  # on 20% of the rows held out before the final fit on all of them
    test_r2: float
    n_train: int  # rows in the final fit (crystals with a fingerprint and a finite value)
    n_test: int

    @classmethod
    def fit(
        cls,
        structures: Sequence[Structure],
        values: Sequence[float],
        seed: int = 0,
        workers: int | None = None,
        progress: bool = False,
        fps: Fingerprints | None = None,
    ) -> PropertyRegressor:
        """Hold out 20% (drawn with `seed`) to measure test MAE and R^2, then refit on every usable row. `fps`:
        precomputed `fingerprints(structures)`, computed here when None."""
        fps = fingerprints(structures, workers=workers, progress=progress) if fps is None else fps
        x, y = property_features(structures, fps), np.asarray(values, dtype=np.float64)
        usable = np.flatnonzero(~fps.failed & np.isfinite(y))
        if len(usable) < 5:
            raise ValueError(f"need at least 5 crystals with a fingerprint and a finite value, got {len(usable)}")
        order = np.random.default_rng(seed).permutation(usable)
        n_test = max(1, round(0.2 * len(order)))
        test, train = order[:n_test], order[n_test:]
        held_out = HistGradientBoostingRegressor(random_state=seed).fit(x[train], y[train])
        predicted = held_out.predict(x[test])
        model = HistGradientBoostingRegressor(random_state=seed).fit(x[usable], y[usable])
        return cls(model, float(mean_absolute_error(y[test], predicted)), float(r2_score(y[test], predicted)),
                   len(usable), n_test)

    def predict(
        self,
        structures: Sequence[Crystal],
        workers: int | None = None,
        progress: bool = False,
        fps: Fingerprints | None = None,
    ) -> np.ndarray:
        """[n] predicted property; NaN for a None structure or one whose fingerprint fails."""
        fps = fingerprints(structures, workers=workers, progress=progress) if fps is None else fps
        out = np.full(len(structures), np.nan)
        if (~fps.failed).any():
            out[~fps.failed] = self.model.predict(property_features(structures, fps)[~fps.failed])
        return out

    def report(self) -> dict[str, float | int]:
        return {"test_mae": self.test_mae, "test_r2": self.test_r2, "n_train": self.n_train, "n_test": self.n_test}


def property_metrics(
    generated: Sequence[Crystal],
    target: float | Sequence[float],
    regressor: PropertyRegressor,
    workers: int | None = None,
    progress: bool = False,
    fps: Fingerprints | None = None,
) -> dict[str, float | int]:
    """How well generated crystals hit a property `target` (a scalar or one per crystal), as `regressor` measures it.

    Keys: mae (|predicted - target| over crystals with a prediction), mean and std of the predicted property,
    within_test_mae (fraction of ALL generated crystals predicted within +/- the regressor's test MAE of the target;
    a crystal without a prediction counts as a miss) and n_predicted. `fps`: precomputed `fingerprints(generated)`.
    """
    predicted = regressor.predict(generated, workers=workers, progress=progress, fps=fps)
    target = np.broadcast_to(np.asarray(target, dtype=np.float64), predicted.shape)
    ok = np.isfinite(predicted)
    error = np.abs(predicted - target)
    hits = np.zeros(len(predicted), dtype=bool)
    hits[ok] = error[ok] <= regressor.test_mae
    return {
        "mae": float(error[ok].mean()) if ok.any() else math.nan,
        "mean": float(predicted[ok].mean()) if ok.any() else math.nan,
        "std": float(predicted[ok].std()) if ok.any() else math.nan,
        "within_test_mae": float(hits.mean()) if len(hits) else math.nan,
        "n_predicted": int(ok.sum()),
    }
