"""The crystal domain: its lattice representation, the symmetries of its network, its three tasks
trained on a few perov_5_dev rows with every metric computed, and its errors on bad requests."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.core import Structure

from archipelago.domains.crystals import writers
from archipelago.domains.crystals.domain import CrystalDomain
from archipelago.domains.crystals.lattice import log_stretch, stretch_matrix
from archipelago.domains.crystals.networks import CrystalNetConfig, CSPNet, cell_pairs
from archipelago.platform import sdk
from tests.crystal_data import PEROV_DEV, needs_perov

TINY = {"steps": 30, "batch_size": 16, "warmup_steps": 2, "progress": False}


def _random_lattices(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3, 3)) + 4 * np.eye(3)


def test_log_stretch_keeps_the_inner_products_and_forgets_the_orientation():
    lattices = _random_lattices(8)
    entries = log_stretch(lattices)
    s = stretch_matrix(torch.from_numpy(entries)).numpy()
    assert np.allclose(s @ s.transpose(0, 2, 1), lattices @ lattices.transpose(0, 2, 1), atol=1e-9)
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    assert np.allclose(log_stretch(lattices @ rotation), entries, atol=1e-12)


def test_every_point_of_the_lattice_space_is_a_cell():
    entries = torch.randn(64, 6, generator=torch.Generator().manual_seed(0)) * 2
    volumes = torch.linalg.det(stretch_matrix(entries))
    assert (volumes > 0).all()
    assert torch.allclose(volumes, torch.exp(entries[:, :3].double().sum(1)), rtol=1e-9)


def test_a_singular_lattice_has_no_log_stretch():
    flat = np.array([[[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]]])
    with pytest.raises(ValueError, match="singular"):
        log_stretch(flat)


def test_cell_pairs_are_every_ordered_pair_within_a_crystal():
    i, j = cell_pairs(torch.tensor([0, 0, 1, 1, 1, 2]), 3)
    got = sorted(zip(i.tolist(), j.tolist(), strict=True))
    assert got == [(0, 1), (1, 0), (2, 3), (2, 4), (3, 2), (3, 4), (4, 2), (4, 3)]


def _net_inputs(b: int = 4, n: int = 5, elements: int = 6) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = {"atom_batch": torch.arange(b).repeat_interleave(n), "atom_type": torch.randint(0, elements + 1, (b * n,),
                                                                                        generator=g),
         "frac_coords": torch.rand(b * n, 3, generator=g), "lattice": torch.randn(b, 6, generator=g)}
    return x, torch.rand(b, generator=g)


def test_the_denoiser_is_invariant_to_periodic_translation_and_equivariant_to_permutation():
    torch.manual_seed(0)
    net = CSPNet(CrystalNetConfig(elements=6, width=32, depth=2)).eval()
    x, t = _net_inputs()
    out = net(x, t)
    shifted = dict(x, frac_coords=torch.remainder(x["frac_coords"] + torch.tensor([0.3, -0.7, 2.0]), 1.0))
    moved = net(shifted, t)
    whole_cell = dict(x, frac_coords=x["frac_coords"] + torch.tensor([1.0, -2.0, 0.0]))  # by a lattice vector
    for other in (moved, net(whole_cell, t)):
        for name in out:
            assert torch.allclose(out[name], other[name], atol=1e-4), name
    order = torch.cat([torch.randperm(5, generator=torch.Generator().manual_seed(b)) + 5 * b for b in range(4)])
    permuted = {**x, "atom_type": x["atom_type"][order], "frac_coords": x["frac_coords"][order]}
    again = net(permuted, t)
    assert torch.allclose(again["frac_coords"], out["frac_coords"][order], atol=1e-4)
    assert torch.allclose(again["atom_type"], out["atom_type"][order], atol=1e-4)
    assert torch.allclose(again["lattice"], out["lattice"], atol=1e-4)


def test_the_router_backbone_gives_logits_per_crystal():
    net = CSPNet(CrystalNetConfig(elements=6, width=16, depth=1, outputs=3))
    x, t = _net_inputs()
    assert net(x, t).shape == (4, 3)


# --- the three tasks on a few real rows -------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> sdk.Run:
    needs_perov()
    rows = pd.read_csv(PEROV_DEV / "train.csv", nrows=64)
    domain = CrystalDomain(conditions=["heat_ref"], width=32, depth=2, frequencies=4, router_width=16,
                           router_depth=1)
    return sdk.fit(rows, str(tmp_path_factory.mktemp("crystals") / "run"), domain=domain, experts=2,
                   expert=TINY, router={**TINY, "steps": 10})


def test_de_novo_samples_are_structures_that_round_trip_through_cif(run, tmp_path):
    out = run.sample(8, strategy="top1", steps=4, seed=0)
    assert len(out.items) == 8 and all(isinstance(s, Structure) for s in out.items)
    assert all(s.num_sites in (5,) for s in out.items)  # perov_5 cells have 5 atoms
    assert all(writers.round_trips(s) for s in out.items)
    paths = writers.write_cifs(out.items, tmp_path / "cifs")
    assert all(Structure.from_file(p).num_sites == 5 for p in paths)


def test_structure_prediction_keeps_the_given_composition(run):
    truth = run.records().slice(0, 6)
    formulas = truth.column("species").to_pylist()
    out = run.sample(6, strategy="full", steps=4, seed=0, given={"atom_type": formulas})
    for structure, species in zip(out.items, formulas, strict=True):
        assert sorted(str(s) for s in structure.species) == sorted(species)
    scores = run.evaluate(out, real=truth, prediction=True, n_valid=6, workers=1, progress=False)
    assert 0.0 <= scores["match_rate"] <= 1.0
    assert math.isnan(scores["rmse"]) or scores["rmse"] >= 0.0


def test_formulas_are_given_as_strings_too(run):
    formula = "".join(run.records().column("species").to_pylist()[0])
    out = run.sample(3, strategy="top1", steps=2, seed=0, given={"atom_type": formula})
    assert all(s.composition.reduced_formula == out.items[0].composition.reduced_formula for s in out.items)


def test_property_conditioned_samples_are_scored_by_a_regressor(run):
    out = run.sample(8, strategy="top1", steps=4, seed=0, conditions={"heat_ref": 1.0}, guidance=2.0)
    assert all(s.properties["heat_ref"] == 1.0 for s in out.items)
    scores = run.evaluate(out, train=run.records(), n_valid=8, workers=1, progress=False)
    assert math.isfinite(scores["heat_ref_mae"]) and math.isfinite(scores["heat_ref_test_mae"])
    for name in ("valid_structure", "valid_composition", "cov_recall", "cov_precision", "emd_density",
                 "emd_elements"):
        assert name in scores and math.isfinite(scores[name]), name


def test_given_compositions_are_checked(run):
    outside = next(symbol for symbol in ("He", "Ne", "Ar", "Kr", "Xe") if symbol not in run.domain.elements)
    with pytest.raises(ValueError, match="vocabulary"):
        run.sample(2, steps=2, given={"atom_type": f"{outside}O3"})
    with pytest.raises(ValueError, match="not a formula"):
        run.sample(2, steps=2, given={"atom_type": "UuoO3"})
    with pytest.raises(ValueError, match="fractional"):
        run.sample(2, steps=2, given={"atom_type": "Sr0.5TiO3"})
    with pytest.raises(ValueError, match="one composition for every crystal"):
        run.sample(3, steps=2, given={"atom_type": [["O"], ["O"]]})
    with pytest.raises(ValueError, match="only atom_type"):
        run.sample(2, steps=2, given={"lattice": [0.0] * 6})


def test_decoding_never_fails_on_wild_lattices():
    domain = CrystalDomain(elements=["O", "Ti"], lattice_mean=[1.4] * 3 + [0.0] * 3, lattice_std=[0.1] * 6)
    batch = {"atom_batch": torch.tensor([0, 0, 1]), "atom_type": torch.tensor([0, 1, 1]),
             "frac_coords": torch.tensor([[0.0, 0, 0], [0.5, 0.5, 0.5], [1.2, -0.1, float("nan")]]),
             "lattice": torch.tensor([[1e6, -1e6, 0, 0, 0, 0], [float("nan")] * 6])}
    structures = domain.decode(batch)
    assert [s.num_sites for s in structures] == [2, 1]
    assert all(s.volume > 0 and np.isfinite(s.lattice.matrix).all() for s in structures)
    assert all((s.frac_coords >= 0).all() and (s.frac_coords < 1).all() for s in structures)


def test_bad_rows_are_dropped_before_training_and_too_many_are_an_error(tmp_path):
    needs_perov()
    rows = pd.read_csv(PEROV_DEV / "train.csv", nrows=20)
    rows.loc[3, "cif"] = "data_broken\n_cell_length_a 4\n"  # does not parse
    domain = CrystalDomain(max_dropped=0.1)
    table = domain.ingest(rows)
    assert table.num_rows == 19 and str(rows.loc[3, "material_id"]) not in table.column("id").to_pylist()
    rows.loc[[4, 5, 6], "cif"] = "garbage"
    with pytest.raises(ValueError, match="unparseable CIF"):
        CrystalDomain(max_dropped=0.1).ingest(rows)


def test_an_unfitted_domain_names_what_is_missing():
    with pytest.raises(ValueError, match="ingest training data first"):
        CrystalDomain().denoiser_network()
