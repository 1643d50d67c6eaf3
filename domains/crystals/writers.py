"""Writing crystals: pymatgen Structures as .cif files and as Parquet records, and the CIF round-trip check.

The formats are those `archipelago.domains.crystals.io.read_crystals` reads. Every file is written to
a hidden temporary name in its folder and renamed into place, so a failure leaves no half-written
file (and the reader skips hidden files).
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter

from archipelago.domains.crystals import data


def write_cifs(structures: Sequence[Structure], folder: str | os.PathLike,
               names: Sequence[str] | None = None) -> list[Path]:
    """One `<name>.cif` per structure in `folder`; returns the paths. Names default to each structure's
    `properties["id"]`, else `sample-<i>`; characters other than letters, digits, ".", "_" and "-" become
    "_". Repeated names are a ValueError, raised before anything is written."""
    if names is not None and len(names) != len(structures):
        raise ValueError(f"{len(structures)} structures but {len(names)} names")
    if names is None:
        names = [str(s.properties.get("id", f"sample-{i}")) for i, s in enumerate(structures)]
    stems = [file_stem(name) for name in names]
    repeated = sorted(stem for stem, count in Counter(stems).items() if count > 1)
    if repeated:
        raise ValueError(f"names {repeated[:5]} name more than one structure; names name the files")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.cif" for stem in stems]
    for structure, path in zip(structures, paths, strict=True):
        _write_atomically(str(CifWriter(structure)), path)
    return paths


def file_stem(name: str) -> str:
    """A name as a safe file stem: unsafe characters as "_", and no leading dot (hidden files are skipped)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return "_" + stem[1:] if stem.startswith(".") else stem or "_"


def _write_atomically(text: str, path: Path) -> None:
    """Write to a hidden temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_structures_parquet(structures: Sequence[Structure], path: str | os.PathLike,
                             properties: Sequence[str] = ()) -> None:
    """Ordered structures as a Parquet records file; ids from `properties["id"]` (else the index), and
    the named property values from `structure.properties` (null when absent)."""
    ids = [str(s.properties.get("id", i)) for i, s in enumerate(structures)]
    values = {name: [s.properties.get(name) for s in structures] for name in properties}
    data.write_parquet(data.structures_to_table(structures, ids, values), path)


def round_trips(structure: Structure) -> bool:
    """Whether the structure written as CIF text and read back by pymatgen matches itself
    (`StructureMatcher` with its default tolerances); False when the text does not read back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            back = Structure.from_str(str(CifWriter(structure)), fmt="cif")
        except Exception:  # CIF text pymatgen cannot read back does not round-trip
            return False
    return bool(StructureMatcher().fit(structure, back))
