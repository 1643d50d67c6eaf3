"""Reading crystals: CDVAE-style CSV files, DataFrames, CIF files, pymatgen Structures and records.

`read_crystals` turns any source into `Entry` objects (an id, a Structure or the reason there is
none, and the requested property values); `prepare` checks and canonicalises them as CDVAE prepares
its crystals (Xie et al. 2022, `build_crystal`: optional primitive cell, Niggli reduction, then the
cell rebuilt from its six lattice parameters so that every crystal has one orientation), dropping
what the model cannot learn from, each under one reason; `check_dropped` turns too many drops into
one error before any work starts.

Sources:

- a CSV file in the CDVAE format (`,material_id,cif,formula,heat_all,...`: one CIF text per row,
  properties as further columns), or a pandas DataFrame with the same columns;
- a folder of .cif files (read in name order, hidden files skipped; the id is the file stem) or one
  .cif file (its first data block);
- a list of pymatgen Structures (the id is `structure.properties["id"]`, else the list index;
  properties are read from `structure.properties`, null where absent, as generated crystals drawn
  without a condition are);
- a records Parquet file or a records `pa.Table` (see `archipelago.domains.crystals.data`).

One bad CIF never stops a read: it becomes an Entry with no structure and an `error`. pymatgen
refuses to build a cell of (near) zero volume, so such a CIF is told apart from one that does not
parse by its cell parameters: its error starts "zero-volume cell". Property values that are
missing, non-numeric or not finite are None. CIF files carry no properties: requested ones are None.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifFile
from tqdm.auto import tqdm

from archipelago.domains.crystals import data

logger = logging.getLogger(__name__)

UNPARSEABLE = "unparseable CIF"
PARTIAL = "partial occupancy"
VOCABULARY = "element outside the vocabulary"
TOO_LARGE = "more atoms than max_atoms"
ZERO_VOLUME = "zero-volume cell"
OVERLAP = "overlapping atoms"
REDUCTION = "reduction failed"
REASONS = (UNPARSEABLE, PARTIAL, VOCABULARY, TOO_LARGE, ZERO_VOLUME, OVERLAP, REDUCTION)
MIN_DISTANCE = 0.5  # Angstrom: closer atoms overlap
MIN_VOLUME = 0.1  # Angstrom^3: a smaller cell is degenerate
PROGRESS_FROM = 500  # rows: fewer are read without a progress bar
_SHOWN_IDS = 5
_CELL = ("_cell_length_a", "_cell_length_b", "_cell_length_c", "_cell_angle_alpha", "_cell_angle_beta",
         "_cell_angle_gamma")
_UNCERTAINTY = re.compile(r"\(\d+\)$")


@dataclass
class Entry:
    """One input crystal: its structure as read, or None with the reason in `error`."""

    id: str
    structure: Structure | None
    properties: dict[str, float | None]
    error: str | None = None  # why there is no structure: "unparseable CIF: ..." or "zero-volume cell: ..."


@dataclass(frozen=True)
class Prepared:
    """The entries `prepare` kept (canonical structures) and the ids it dropped, per reason."""

    entries: list[Entry]
    dropped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """The number of dropped crystals per reason, every reason present (0 when none)."""
        return {reason: len(self.dropped.get(reason, ())) for reason in REASONS}


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_crystals(source: Any, properties: Sequence[str] = (), id_column: str = "material_id",
                  cif_column: str = "cif") -> list[Entry]:
    """Read crystals from any source of the module docstring, in the source's order.

    `properties` names the property columns (or Structure properties) to keep, as floats. A missing
    file or folder, an unknown source type, or a missing id, CIF or property column is a ValueError
    naming it; a CIF that does not parse is an Entry with `structure=None` and an `error`.
    """
    properties = list(properties)
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source), properties, id_column, cif_column)
    if isinstance(source, pd.DataFrame):
        return _read_frame(source, properties, id_column, cif_column, "the DataFrame")
    if isinstance(source, pa.Table):
        return _read_table(source, properties, "the table")
    if isinstance(source, Structure):
        raise ValueError("read_crystals takes a list of Structures, not one Structure: wrap it in a list")
    if isinstance(source, (list, tuple)) and all(isinstance(item, Structure) for item in source):
        return _read_structures(source, properties)
    raise ValueError(f"cannot read crystals from {type(source).__name__}: pass a CSV, CIF or Parquet path, a folder "
                     "of .cif files, a DataFrame, a records pa.Table or a list of pymatgen Structures")


def _read_path(path: Path, properties: list[str], id_column: str, cif_column: str) -> list[Entry]:
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_cif_files(_cif_files(path), properties)
    if suffix == ".csv":
        frame = pd.read_csv(path, dtype={id_column: str, cif_column: str})
        return _read_frame(frame, properties, id_column, cif_column, path)
    if suffix == ".cif":
        return _read_cif_files([path], properties)
    if suffix in (".parquet", ".pq"):
        return _read_table(data.read_parquet(path), properties, path)
    raise ValueError(f"{path}: unknown file type {suffix!r}; expected a CDVAE-style .csv, a .cif, a records "
                     ".parquet or a folder of .cif files")


def _cif_files(folder: Path) -> list[Path]:
    # Hidden files are skipped: the writers' temporary files start with a dot.
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() == ".cif" and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder}: no .cif files in the folder")
    return files


def _read_cif_files(paths: Sequence[Path], properties: list[str]) -> list[Entry]:
    if properties:
        logger.warning("CIF files carry no properties: %s are null for every crystal", properties)
    texts = (path.read_text(errors="replace") for path in paths)
    empty = dict.fromkeys(properties)
    return [Entry(path.stem, structure, dict(empty), error)
            for path, (structure, error) in zip(paths, _parse_all(texts, len(paths)), strict=True)]


def _read_frame(frame: pd.DataFrame, properties: list[str], id_column: str, cif_column: str,
                where: str | Path) -> list[Entry]:
    for column in (id_column, cif_column, *properties):
        if column not in frame.columns:
            raise ValueError(f"{where}: no column {column!r} (columns: {[str(c) for c in frame.columns]})")
    ids = [_id(value, row) for row, value in enumerate(frame[id_column].tolist())]
    values = {name: pd.to_numeric(frame[name], errors="coerce").tolist() for name in properties}
    parsed = _parse_all(frame[cif_column].tolist(), len(frame))
    return [Entry(crystal_id, structure, {name: data.as_property(values[name][row]) for name in properties}, error)
            for row, (crystal_id, (structure, error)) in enumerate(zip(ids, parsed, strict=True))]


def _id(value: Any, row: int) -> str:
    """A cell of the id column as an id; an empty cell is named by its row."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return f"row-{row}"
    return str(value).strip()


def _read_table(table: pa.Table, properties: list[str], where: str | Path) -> list[Entry]:
    data.check_columns(table, where)
    missing = [name for name in properties if name not in table.column_names]
    if missing:
        raise ValueError(f"{where}: no property columns {missing} (columns: {table.column_names})")
    return [Entry(str(s.properties["id"]), s, {name: data.as_property(s.properties[name]) for name in properties})
            for s in data.table_to_structures(table.select([*data.BASE_COLUMNS, *properties]))]


def _read_structures(structures: Sequence[Structure], properties: list[str]) -> list[Entry]:
    absent = [name for name in properties if not any(name in s.properties for s in structures)]
    if structures and absent:  # generated crystals drawn without a condition carry none: null, as for CIF files
        logger.warning("no Structure has the properties %s in `structure.properties`: they are null", absent)
    return [Entry(str(s.properties.get("id", index)), s.copy(),
                  {name: data.as_property(s.properties.get(name)) for name in properties})
            for index, s in enumerate(structures)]


# --------------------------------------------------------------------------------------------------
# Parsing CIF text
# --------------------------------------------------------------------------------------------------


def _parse_all(texts: Any, total: int) -> list[tuple[Structure | None, str | None]]:
    """Parse every CIF text, with a progress bar for long inputs; pymatgen's warnings are counted and
    logged once, not shown one by one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parsed = [parse_cif(text) for text in tqdm(texts, total=total, desc="reading CIFs", unit="crystal",
                                                   disable=total < PROGRESS_FROM)]
    if caught:
        logger.info("pymatgen warned %d times while parsing %d CIFs (first: %s)", len(caught), total,
                    str(caught[0].message).splitlines()[0])
    return parsed


def parse_cif(text: Any) -> tuple[Structure | None, str | None]:
    """A structure from CIF text (its first data block), or None and why not."""
    if not isinstance(text, str) or not text.strip():
        return None, f"{UNPARSEABLE}: no CIF text"
    try:
        return Structure.from_str(text, fmt="cif"), None
    except Exception as error:  # pymatgen raises many types for bad CIF text
        volume = _cell_volume(text)
        if volume is not None and not volume >= MIN_VOLUME:
            return None, f"{ZERO_VOLUME}: the cell parameters give a volume of {volume:.3g} A^3"
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return None, f"{UNPARSEABLE}: {lines[0]}"


def _cell_volume(text: str) -> float | None:
    """The volume of the cell a CIF's six cell parameters describe (0 when they describe no cell), or None
    when they are not all there."""
    try:
        blocks = list(CifFile.from_str(text).data.values())
        a, b, c, alpha, beta, gamma = (_number(blocks[0].data[key]) for key in _CELL)
    except Exception:  # any CIF text pymatgen cannot split into blocks or whose cell it cannot read
        return None
    cosines = np.cos(np.radians([alpha, beta, gamma]))
    shape = 1 - (cosines**2).sum() + 2 * cosines.prod()
    return float(a * b * c * math.sqrt(max(shape, 0.0)))


def _number(value: Any) -> float:
    """A CIF number such as "4.2793(2)" as a float."""
    return float(_UNCERTAINTY.sub("", str(value).strip()))


# --------------------------------------------------------------------------------------------------
# Canonical form and checks
# --------------------------------------------------------------------------------------------------


def canonical(structure: Structure, niggli: bool = True, primitive: bool = False) -> Structure:
    """The structure as CDVAE prepares it: optionally its primitive cell, then Niggli reduced, then rebuilt
    from `Lattice.from_parameters` (a canonical orientation) with the same species, fractional coordinates
    wrapped into [0, 1) and properties."""
    properties = dict(structure.properties)  # get_reduced_structure does not keep them
    if primitive:
        structure = structure.get_primitive_structure()
    if niggli:
        structure = structure.get_reduced_structure()
    return Structure(Lattice.from_parameters(*structure.lattice.parameters), [site.species for site in structure],
                     data.wrap(structure.frac_coords), properties=properties)


def prepare(entries: Sequence[Entry], max_atoms: int, elements: Collection[str] | None = None, niggli: bool = True,
            primitive: bool = False, min_distance: float = MIN_DISTANCE, min_volume: float = MIN_VOLUME) -> Prepared:
    """Check every entry and keep the canonical structures of those that pass.

    An entry is dropped under the first reason that applies, in the order of REASONS: no structure
    ("unparseable CIF", or "zero-volume cell" when its error says so), a partially occupied or vacant
    site, an element outside `elements` (when given), more than `max_atoms` atoms (with
    `primitive=True`, in the primitive cell), a cell volume below `min_volume` (A^3), two atoms closer
    than `min_distance` (A, periodic), and last an exception in `canonical`. One warning per reason
    logs its count and first ids.
    """
    vocabulary = None if elements is None else set(elements)
    kept, dropped, unknown = [], {}, set()
    for entry in entries:
        reason = _reason(entry, max_atoms, vocabulary, primitive, min_distance, min_volume, unknown)
        if reason is None:
            try:
                kept.append(dataclasses.replace(entry, structure=canonical(entry.structure, niggli, primitive)))
                continue
            except Exception:  # Niggli reduction raises several types on degenerate cells
                reason = REDUCTION
        dropped.setdefault(reason, []).append(entry.id)
    for reason in REASONS:
        if reason in dropped:
            detail = f" (unknown elements: {sorted(unknown)})" if reason == VOCABULARY else ""
            logger.warning("dropped %d crystals: %s%s: %s", len(dropped[reason]), reason, detail,
                           _first_ids(dropped[reason]))
    return Prepared(kept, {reason: dropped[reason] for reason in REASONS if reason in dropped})


def _reason(entry: Entry, max_atoms: int, vocabulary: set[str] | None, primitive: bool, min_distance: float,
            min_volume: float, unknown: set[str]) -> str | None:
    """Why an entry is dropped (the first reason in REASONS order, before reduction), or None."""
    structure = entry.structure
    if structure is None:
        return ZERO_VOLUME if (entry.error or "").startswith(ZERO_VOLUME) else UNPARSEABLE
    if not structure.is_ordered:
        return PARTIAL
    outside = set() if vocabulary is None else {site.specie.symbol for site in structure} - vocabulary
    if outside:
        unknown.update(outside)
        return VOCABULARY
    if _too_many_atoms(structure, max_atoms, primitive):
        return TOO_LARGE
    volume = structure.lattice.volume
    if not (np.isfinite(structure.lattice.matrix).all() and volume >= min_volume):
        return ZERO_VOLUME
    if len(structure) > 1 and _closest_pair(structure) < min_distance:
        return OVERLAP
    return None


def _too_many_atoms(structure: Structure, max_atoms: int, primitive: bool) -> bool:
    if len(structure) <= max_atoms:
        return False
    if not primitive:
        return True
    try:
        return len(structure.get_primitive_structure()) > max_atoms
    except Exception:  # a degenerate cell: counted by its own atoms
        return True


def _closest_pair(structure: Structure) -> float:
    """The shortest periodic distance between two different sites."""
    distances = structure.distance_matrix.copy()
    np.fill_diagonal(distances, np.inf)
    return float(distances.min())


def check_dropped(prepared: Prepared, total: int, max_dropped: float) -> None:
    """A ValueError when the input held no crystals, when every one was dropped, or when the dropped share
    exceeds `max_dropped`; the message names each reason with its count and first ids."""
    if total == 0:
        raise ValueError("the input holds no crystals")
    dropped = sum(len(ids) for ids in prepared.dropped.values())
    if prepared.entries and dropped <= max_dropped * total:
        return
    reasons = "; ".join(f"{reason}: {len(ids)} ({_first_ids(ids)})" for reason, ids in prepared.dropped.items())
    what = "every crystal was dropped" if not prepared.entries else \
        f"{dropped} of {total} crystals ({dropped / total:.1%}) were dropped, more than max_dropped = {max_dropped}"
    raise ValueError(f"{what}: {reasons}")


def _first_ids(ids: Sequence[str]) -> str:
    return ", ".join(ids[:_SHOWN_IDS]) + (", ..." if len(ids) > _SHOWN_IDS else "")
