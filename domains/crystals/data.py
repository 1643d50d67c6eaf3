"""Crystal records: pymatgen Structures as Arrow rows and back, Parquet files, and partition features.

A record is one crystal (the schema every part of the crystal domain shares):

- `id` (string): the input's name for the crystal (a CSV's material_id, a .cif file's stem, ...);
- `num_atoms` (int32);
- `species` (list<string>): the element symbol of each site, in site order (oxidation states and
  other decorations are not kept);
- `frac_coords` (list<float64>): 3 per atom, row-major, wrapped into [0, 1);
- `lattice` (list<float64>): the 9 numbers of the row-major lattice matrix (rows are the lattice
  vectors, in Angstrom), as `structure.lattice.matrix.reshape(-1)`;
- one nullable float64 column per property (a formation energy, a band gap), named as in the input.

This is also the Parquet format the domain reads and writes, so a table written by `write_parquet`
reads back as is.

Partition features (`crystal_features`) are what k-means clusters crystals by: the composition as
atom fractions over the element vocabulary, then 8 lattice statistics (the sorted lattice lengths,
the sorted angles, the volume per atom and the density), in their own units: the partitioner
standardizes every feature with the training set's mean and spread, which it keeps, so that samples
and new records are placed with the same scale (a z-score per table would give each its own). The
statistics are computed from the 9 lattice numbers with numpy, without building Structures, so that
they run on large tables.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pymatgen.core import Element, Lattice, Structure

BASE_COLUMNS = ("id", "num_atoms", "species", "frac_coords", "lattice")
LATTICE_STATISTICS = ("length_1", "length_2", "length_3", "angle_1", "angle_2", "angle_3", "volume_per_atom",
                      "density")
# grams per cm^3 of one atomic mass unit per cubic Angstrom: 1.66053906660e-24 g / 1e-24 cm^3
AMU_PER_CUBIC_ANGSTROM = 1.66053906660


def schema(properties: Sequence[str] = ()) -> pa.Schema:
    """The records schema with one float64 property column per name, in the order given."""
    fields = [pa.field("id", pa.string()), pa.field("num_atoms", pa.int32()),
              pa.field("species", pa.list_(pa.string())), pa.field("frac_coords", pa.list_(pa.float64())),
              pa.field("lattice", pa.list_(pa.float64()))]
    return pa.schema(fields + [pa.field(name, pa.float64()) for name in properties])


def wrap(frac_coords: np.ndarray) -> np.ndarray:
    """Fractional coordinates wrapped into [0, 1) (x % 1 rounds a tiny negative x up to 1.0: that is 0)."""
    wrapped = np.mod(frac_coords, 1.0)
    return np.where(wrapped >= 1.0, 0.0, wrapped)


def to_record(structure: Structure, crystal_id: str) -> dict:
    """An ordered structure as a record without properties."""
    if not structure.is_ordered:
        raise ValueError(f"crystal {crystal_id!r} has partially occupied sites: records hold one element per site")
    return {"id": crystal_id, "num_atoms": len(structure),
            "species": [site.specie.symbol for site in structure],
            "frac_coords": wrap(structure.frac_coords).reshape(-1).tolist(),
            "lattice": structure.lattice.matrix.reshape(-1).tolist()}


def structures_to_table(structures: Sequence[Structure], ids: Sequence[str],
                        properties: Mapping[str, Sequence[float | None]] | None = None) -> pa.Table:
    """Ordered structures as a records table; `properties` maps a column name to one value per structure
    (None, NaN or infinite for a missing value)."""
    properties = dict(properties or {})
    for name, values in [("ids", ids), *properties.items()]:
        if len(values) != len(structures):
            raise ValueError(f"{len(structures)} structures but {len(values)} values in {name!r}")
    rows = [to_record(structure, str(crystal_id)) for structure, crystal_id in zip(structures, ids, strict=True)]
    for name, values in properties.items():
        for row, value in zip(rows, values, strict=True):
            row[name] = as_property(value)
    return pa.Table.from_pylist(rows, schema=schema(list(properties)))


def as_property(value: object) -> float | None:
    """A property value as a finite float, or None when it is missing, non-numeric or not finite."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def property_columns(table: pa.Table) -> list[str]:
    """The names of a records table's property columns, in table order."""
    return [name for name in table.column_names if name not in BASE_COLUMNS]


def table_to_structures(table: pa.Table) -> list[Structure]:
    """Records back as Structures; `properties` holds the id and every property value (None when null)."""
    check_columns(table, "the table")
    names = property_columns(table)
    structures = []
    for row in table.to_pylist():
        coords = np.asarray(row["frac_coords"], dtype=np.float64).reshape(-1, 3)
        lattice = Lattice(np.asarray(row["lattice"], dtype=np.float64).reshape(3, 3))
        properties = {"id": row["id"], **{name: row[name] for name in names}}
        structures.append(Structure(lattice, row["species"], coords, properties=properties))
    return structures


def check_columns(table: pa.Table, where: str | Path) -> None:
    """A ValueError naming the record columns that `table` lacks."""
    missing = [name for name in BASE_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"{where}: crystal records need the columns {list(BASE_COLUMNS)}; missing {missing}")


def read_parquet(path: str | Path) -> pa.Table:
    """A records table written by `write_parquet` (or by hand in the same format)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from error
    check_columns(table, path)
    return table


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """A records table as Parquet, through a hidden temporary file renamed into place."""
    check_columns(table, "the table")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _flat_species(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Every site's symbol [sum num_atoms] and the row it belongs to."""
    species = table.column("species").combine_chunks()
    symbols = species.flatten().to_numpy(zero_copy_only=False).astype(str)
    rows = np.repeat(np.arange(len(species)), np.diff(species.offsets.to_numpy()))
    return symbols, rows


def composition_fractions(table: pa.Table, elements: Sequence[str]) -> np.ndarray:
    """Atom fractions of each element of the vocabulary per crystal, [N, len(elements)]; rows sum to 1."""
    symbols, rows = _flat_species(table)
    index = {symbol: i for i, symbol in enumerate(elements)}
    unknown = sorted(set(symbols.tolist()) - index.keys())
    if unknown:
        raise ValueError(f"elements {unknown} are not in the vocabulary {list(elements)}")
    counts = np.zeros((table.num_rows, len(elements)))
    np.add.at(counts, (rows, np.array([index[s] for s in symbols], dtype=np.int64)), 1.0)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1.0)


@functools.cache
def atomic_mass(symbol: str) -> float:
    """An element's atomic mass in atomic mass units."""
    return float(Element(symbol).atomic_mass)


def _angle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The angle in degrees between row vectors u and v [N, 3]."""
    cosine = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


def lattice_statistics(table: pa.Table) -> np.ndarray:
    """Per crystal [N, 8]: the sorted lattice lengths (A), the sorted angles (degrees), the volume per atom
    (A^3) and the density (g/cm^3), from the 9 lattice numbers and the species (see LATTICE_STATISTICS)."""
    matrices = np.asarray(table.column("lattice").combine_chunks().flatten(), dtype=np.float64).reshape(-1, 3, 3)
    a, b, c = matrices[:, 0], matrices[:, 1], matrices[:, 2]
    lengths = np.linalg.norm(matrices, axis=-1)
    angles = np.stack([_angle(b, c), _angle(a, c), _angle(a, b)], 1)
    volume = np.abs(np.linalg.det(matrices))
    num_atoms = np.asarray(table.column("num_atoms"), dtype=np.float64)
    symbols, rows = _flat_species(table)
    unique, inverse = np.unique(symbols, return_inverse=True)
    masses = np.array([atomic_mass(s) for s in unique])[inverse]
    mass = np.bincount(rows, weights=masses, minlength=table.num_rows)
    density = AMU_PER_CUBIC_ANGSTROM * mass / volume
    return np.column_stack([np.sort(lengths, 1), np.sort(angles, 1), volume / num_atoms, density])


def crystal_features(table: pa.Table, elements: Sequence[str]) -> np.ndarray:
    """The partition features [N, len(elements) + 8]: the composition fractions over `elements`, then the
    lattice statistics (see the module docstring)."""
    return np.concatenate([composition_fractions(table, elements), lattice_statistics(table)], 1)
