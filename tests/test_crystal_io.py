"""Crystal reading, checking and writing (`domains/crystals/io.py`, `data.py`, `writers.py`) on slices of
the perov_5 development split: every source reads the same crystals, records round-trip, canonical cells
are Niggli reduced, each bad input is dropped under its reason, files are written atomically, and the
vectorised lattice statistics agree with pymatgen."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from archipelago.domains.crystals import data, io, writers

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "crystals" / "perov_5_dev"
ROWS = 30
PROPERTIES = ["heat_ref", "dir_gap"]
ROTATION = np.array([[0.36, 0.48, -0.8], [-0.8, 0.6, 0.0], [0.48, 0.64, 0.6]])  # orthogonal, det 1

pytestmark = pytest.mark.skipif(not (DEV / "train.csv").exists(), reason=f"the perov_5_dev split is not at {DEV}")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """The first rows of the perov_5_dev training split, in the CDVAE CSV format."""
    return pd.read_csv(DEV / "train.csv", nrows=ROWS)


@pytest.fixture(scope="module")
def entries(frame: pd.DataFrame) -> list[io.Entry]:
    return io.read_crystals(frame, properties=PROPERTIES)


@pytest.fixture(scope="module")
def structures(entries: list[io.Entry]) -> list[Structure]:
    """The rows as Structures whose properties hold their id and property values."""
    return [Structure.from_dict({**e.structure.as_dict(), "properties": {"id": e.id, **e.properties}})
            for e in entries]


@pytest.fixture(scope="module")
def vocabulary(entries: list[io.Entry]) -> list[str]:
    return sorted({site.specie.symbol for e in entries for site in e.structure})


def _same_cell(a: Structure, b: Structure) -> bool:
    """The same species, lattice matrix and fractional coordinates, to CIF precision."""
    return (a.species == b.species and np.allclose(a.lattice.matrix, b.lattice.matrix, atol=1e-6)
            and np.allclose(a.frac_coords % 1.0, b.frac_coords % 1.0, atol=1e-6))


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def test_every_source_reads_the_same_crystals(tmp_path: Path, frame: pd.DataFrame, entries: list[io.Entry],
                                              structures: list[Structure]) -> None:
    frame.to_csv(tmp_path / "rows.csv", index=False)
    paths = writers.write_cifs(structures, tmp_path / "cifs")
    writers.write_structures_parquet(structures, tmp_path / "records.parquet", properties=PROPERTIES)
    table = data.structures_to_table(structures, [e.id for e in entries], {n: [e.properties[n] for e in entries]
                                                                          for n in PROPERTIES})
    sources = {"csv": tmp_path / "rows.csv", "structures": structures, "parquet": tmp_path / "records.parquet",
               "table": table, "folder": tmp_path / "cifs"}
    expected_ids = [str(i) for i in frame["material_id"]]
    assert [e.id for e in entries] == expected_ids
    for name, source in sources.items():
        read = io.read_crystals(source, properties=PROPERTIES if name != "folder" else ())
        order = sorted(range(ROWS), key=lambda i: paths[i].name) if name == "folder" else range(ROWS)
        assert [e.id for e in read] == [expected_ids[i] for i in order], name
        assert all(_same_cell(e.structure, entries[i].structure) for e, i in zip(read, order, strict=True)), name
        if name != "folder":
            assert [e.properties for e in read] == [e.properties for e in entries], name
    (single,) = io.read_crystals(paths[0], properties=["heat_ref"])
    assert single.id == paths[0].stem and _same_cell(single.structure, structures[0])
    assert single.properties == {"heat_ref": None}  # CIF files carry no properties


def test_properties_are_floats_with_nulls_for_missing_or_non_numeric(frame: pd.DataFrame) -> None:
    rows = frame.head(4).astype({"heat_ref": object})
    rows.loc[1, "heat_ref"] = None
    rows.loc[2, "heat_ref"] = "n/a"
    read = io.read_crystals(rows, properties=["heat_ref"])
    values = [e.properties["heat_ref"] for e in read]
    assert values[1] is None and values[2] is None
    assert [type(v) for v in values[::3]] == [float, float] and values[0] == pytest.approx(frame.heat_ref[0])
    table = data.structures_to_table([e.structure for e in read], [e.id for e in read], {"heat_ref": values})
    assert table.schema.field("heat_ref").type == pa.float64() and table.column("heat_ref").null_count == 2


def test_a_missing_property_column_names_it_and_the_columns_present(tmp_path: Path, frame: pd.DataFrame) -> None:
    frame.head(3).to_csv(tmp_path / "rows.csv", index=False)
    with pytest.raises(ValueError, match=r"no column 'band_gap'.*'heat_ref'"):
        io.read_crystals(tmp_path / "rows.csv", properties=["band_gap"])


@pytest.mark.parametrize("source, message", [("missing.csv", "no such file"), ("rows.txt", "unknown file type"),
                                             (42, "cannot read crystals from int")])
def test_a_missing_path_or_unknown_source_is_named(tmp_path: Path, source: object, message: str) -> None:
    (tmp_path / "rows.txt").write_text("not crystals")
    with pytest.raises(ValueError, match=message):
        io.read_crystals(tmp_path / source if isinstance(source, str) else source)


# --------------------------------------------------------------------------------------------------
# Canonical cells and records
# --------------------------------------------------------------------------------------------------


def test_canonical_gives_the_niggli_cell_of_any_setting_and_matches_the_original(structures: list[Structure]) -> None:
    for structure in structures[:5]:
        skewed = structure.copy()
        skewed.make_supercell([[1, 1, 0], [0, 1, 0], [1, 0, 1]])  # the same cell, a skewed basis (det 1)
        rotated = Structure(Lattice(skewed.lattice.matrix @ ROTATION.T), skewed.species, skewed.frac_coords,
                            properties=skewed.properties)
        out = io.canonical(rotated)
        params = np.array(out.lattice.parameters)
        assert np.allclose(params, out.lattice.get_niggli_reduced_lattice().parameters, atol=1e-6)
        assert np.allclose(params, io.canonical(structure).lattice.parameters, atol=1e-6)
        assert np.allclose(out.lattice.matrix, Lattice.from_parameters(*params).matrix)
        assert ((out.frac_coords >= 0) & (out.frac_coords < 1)).all()
        assert StructureMatcher().fit(structure, out) and out.properties["id"] == structure.properties["id"]


def test_records_round_trip_structures_ids_and_properties(tmp_path: Path, structures: list[Structure]) -> None:
    ids = [s.properties["id"] for s in structures]
    values = {name: [s.properties[name] for s in structures] for name in PROPERTIES}
    table = data.structures_to_table(structures, ids, values)
    assert table.schema == data.schema(PROPERTIES)
    data.write_parquet(table, tmp_path / "records.parquet")
    back = data.table_to_structures(data.read_parquet(tmp_path / "records.parquet"))
    assert [s.properties for s in back] == [s.properties for s in structures]
    assert all(_same_cell(a, b) for a, b in zip(back, structures, strict=True))
    assert os.listdir(tmp_path) == ["records.parquet"]


def test_read_parquet_names_the_missing_columns(tmp_path: Path) -> None:
    data.pq.write_table(pa.table({"id": ["a"], "num_atoms": pa.array([1], pa.int32())}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"missing \['species', 'frac_coords', 'lattice'\]"):
        data.read_parquet(tmp_path / "bad.parquet")


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


def _hand_cif(a: float, b: float, c: float, gamma: float) -> str:
    """CIF text of a two-atom cell, written by hand: pymatgen refuses to build degenerate cells."""
    return f"""data_flat
_symmetry_space_group_name_H-M   'P 1'
_cell_length_a   {a}
_cell_length_b   {b}
_cell_length_c   {c}
_cell_angle_alpha   90.0
_cell_angle_beta   90.0
_cell_angle_gamma   {gamma}
loop_
 _symmetry_equiv_pos_as_xyz
  'x, y, z'
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
  O  O0  0.0  0.0  0.0  1
  O  O1  0.5  0.5  0.5  1
"""


def _outsider(vocabulary: list[str]) -> str:
    return next(e for e in ("U", "Th", "Pu", "Np") if e not in vocabulary)


@pytest.fixture(scope="module")
def bad_rows(frame: pd.DataFrame, structures: list[Structure], vocabulary: list[str]) -> dict[str, tuple[str, str]]:
    """id -> (CIF text, the reason it must be dropped for)."""
    supercell = structures[0].copy()
    supercell.make_supercell([2, 2, 2])  # 40 atoms
    cases = {"garbage": ("this is not a CIF\n_cell_length_a banana", io.UNPARSEABLE),
             "mixed": (Structure(Lattice.cubic(4.0), [{"Na": 0.5, "K": 0.5}, "O"], [[0, 0, 0], [0.5] * 3]),
                       io.PARTIAL),
             "outsider": (Structure(Lattice.cubic(4.0), [_outsider(vocabulary), "O"], [[0, 0, 0], [0.5] * 3]),
                          io.VOCABULARY),
             "large": (supercell, io.TOO_LARGE),
             "flat": (_hand_cif(4.0, 4.0, 4.0, 180.0), io.ZERO_VOLUME),
             "thin": (_hand_cif(4.0, 4.0, 0.0, 90.0), io.ZERO_VOLUME),
             "crowded": (Structure(Lattice.cubic(4.0), ["Na", "O"], [[0, 0, 0], [0.05, 0, 0]]), io.OVERLAP)}
    return {gid: (text if isinstance(text, str) else str(CifWriter(text)), reason)
            for gid, (text, reason) in cases.items()}


@pytest.fixture(scope="module")
def mixed_input(frame: pd.DataFrame, bad_rows: dict[str, tuple[str, str]]) -> pd.DataFrame:
    good = frame.head(10)[["material_id", "cif", "heat_ref"]].astype({"material_id": str})
    bad = pd.DataFrame({"material_id": list(bad_rows), "cif": [text for text, _ in bad_rows.values()],
                        "heat_ref": 0.0})
    return pd.concat([good, bad], ignore_index=True)


def test_each_bad_input_is_dropped_under_its_reason(mixed_input: pd.DataFrame, bad_rows: dict[str, tuple[str, str]],
                                                    vocabulary: list[str], caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pymatgen's CIF warnings are counted, not shown
        read = io.read_crystals(mixed_input, properties=["heat_ref"])
    assert read[10].structure is None and read[10].error.startswith("unparseable CIF: ")
    with caplog.at_level(logging.WARNING, logger=io.__name__):
        prepared = io.prepare(read, max_atoms=20, elements=vocabulary)
    expected: dict[str, list[str]] = {}
    for gid, (_, reason) in bad_rows.items():
        expected.setdefault(reason, []).append(gid)
    assert prepared.dropped == {reason: expected[reason] for reason in io.REASONS if reason in expected}
    assert prepared.counts[io.ZERO_VOLUME] == 2 and prepared.counts[io.REDUCTION] == 0
    assert [e.id for e in prepared.entries] == list(mixed_input.material_id[:10])
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == len(expected)
    assert any("2 crystals: zero-volume cell: flat, thin" in m for m in logged)
    assert any(f"{io.VOCABULARY} (unknown elements: ['{_outsider(vocabulary)}']): outsider" in m for m in logged)


def test_a_failed_reduction_is_its_own_reason(entries: list[io.Entry], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(structure: Structure, niggli: bool, primitive: bool) -> Structure:
        raise RuntimeError("no reduced cell")

    monkeypatch.setattr(io, "canonical", refuse)
    prepared = io.prepare(entries[:3], max_atoms=20)
    assert prepared.dropped == {io.REDUCTION: [e.id for e in entries[:3]]} and prepared.entries == []


def test_check_dropped_raises_past_max_dropped_and_names_reasons_and_ids(mixed_input: pd.DataFrame,
                                                                         vocabulary: list[str]) -> None:
    prepared = io.prepare(io.read_crystals(mixed_input), max_atoms=20, elements=vocabulary)
    total = len(mixed_input)  # 10 good, 7 bad
    with pytest.raises(ValueError, match=r"7 of 17 crystals .* max_dropped = 0.3.*overlapping atoms: 1 \(crowded\)"):
        io.check_dropped(prepared, total, max_dropped=0.3)
    io.check_dropped(prepared, total, max_dropped=0.5)
    with pytest.raises(ValueError, match="every crystal was dropped: unparseable CIF: 1 \\(garbage\\)"):
        io.check_dropped(io.Prepared([], {io.UNPARSEABLE: ["garbage"]}), 1, max_dropped=1.0)
    with pytest.raises(ValueError, match="holds no crystals"):
        io.check_dropped(io.prepare(io.read_crystals([]), max_atoms=20), 0, max_dropped=1.0)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def test_write_cifs_names_files_and_leaves_no_temporary_files(tmp_path: Path, structures: list[Structure]) -> None:
    paths = writers.write_cifs(structures[:3], tmp_path)
    assert [p.name for p in paths] == [f"{s.properties['id']}.cif" for s in structures[:3]]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)
    assert all(_same_cell(Structure.from_file(p), s) for p, s in zip(paths, structures, strict=False))
    unnamed = Structure(Lattice.cubic(4.0), ["Na", "O"], [[0, 0, 0], [0.5] * 3])
    assert [p.name for p in writers.write_cifs([unnamed], tmp_path / "new")] == ["sample-0.cif"]
    assert [p.name for p in writers.write_cifs([unnamed], tmp_path, names=["../a b"])] == ["_._a_b.cif"]
    with pytest.raises(ValueError, match="more than one structure"):
        writers.write_cifs([unnamed, unnamed], tmp_path / "twice", names=["x", "x"])
    assert not (tmp_path / "twice").exists()


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary_file(tmp_path: Path, structures: list[Structure],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(writers.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        writers.write_cifs(structures[:1], tmp_path)
    assert os.listdir(tmp_path) == []


def test_perov_structures_round_trip_through_cif_text(structures: list[Structure]) -> None:
    assert all(writers.round_trips(s) for s in structures[:10])
    merged = Structure(Lattice.cubic(4.0), ["Na", "Na", "O"], [[0, 0, 0], [1e-5, 0, 0], [0.5] * 3])
    assert not writers.round_trips(merged)  # the CIF reader merges the two Na sites


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def test_lattice_statistics_match_pymatgen(structures: list[Structure]) -> None:
    table = data.structures_to_table(structures, [s.properties["id"] for s in structures])
    stats = data.lattice_statistics(table)
    expected = np.array([[*sorted(s.lattice.abc), *sorted(s.lattice.angles), s.volume / len(s), s.density]
                         for s in structures])
    assert stats.shape == (ROWS, len(data.LATTICE_STATISTICS))
    np.testing.assert_allclose(stats, expected, rtol=1e-6)


def test_composition_fractions_are_atom_fractions_summing_to_one(structures: list[Structure],
                                                                 vocabulary: list[str]) -> None:
    table = data.structures_to_table(structures, [s.properties["id"] for s in structures])
    fractions = data.composition_fractions(table, vocabulary)
    np.testing.assert_allclose(fractions.sum(1), 1.0)
    expected = [[s.composition.get_atomic_fraction(e) for e in vocabulary] for s in structures]
    np.testing.assert_allclose(fractions, expected)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        data.composition_fractions(table, vocabulary[1:])


def test_crystal_features_are_fractions_then_lattice_statistics(structures: list[Structure],
                                                                vocabulary: list[str]) -> None:
    table = data.structures_to_table(structures, [s.properties["id"] for s in structures])
    features = data.crystal_features(table, vocabulary)
    k = len(vocabulary)
    assert features.shape == (ROWS, k + 8)
    np.testing.assert_allclose(features[:, :k], data.composition_fractions(table, vocabulary))
    # in their own units: the partitioner standardizes with the training set's scale, kept for new records
    np.testing.assert_allclose(features[:, k:], data.lattice_statistics(table))
    np.testing.assert_allclose(data.crystal_features(table.slice(0, 3), vocabulary), features[:3])
