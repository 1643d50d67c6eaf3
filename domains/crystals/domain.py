"""The crystal domain: periodic structures diffused as fractional coordinates, a lattice and atom types.

Fields, one row per atom (`atom_batch` maps atoms to crystals) unless said otherwise:
- `frac_coords` [R, 3]: fractional coordinates on the flat torus (`TorusPath`), as in DiffCSP and FlowMM,
  their loss weighted by `coordinate_weight`;
- `atom_type` [R]: the element, on the masked path over the elements present in the training data;
- `lattice` [B, 6]: the standardized upper entries of log S, the rotation-invariant stretch of the
  cell (`lattice.py` says why this representation), on the affine Gaussian path.
The number of atoms is drawn from the chosen expert's histogram (`statistics`: "atoms"). In the
ensemble, coordinates and lattices mix as velocities and atom types as posteriors.

Tasks, all from one expert per cluster:
- de novo generation: everything generated;
- structure prediction (DiffCSP's task): the atom types given (`given={"atom_type": formulas}`), so
  the count and the elements are fixed and coordinates and lattice are generated. Training gives the
  types of a `prediction_share` of crystals (`given_masks`), so one network learns both tasks;
- property-conditioned generation (as MatterGen): property columns named in `conditions` become
  continuous conditions with classifier-free guidance.

Sources for `ingest` (see `io.read_crystals`): a CSV with a CIF column (CDVAE's format), a DataFrame,
a folder of .cif files, a .cif file, a list of pymatgen `Structure`s, a records Parquet file or table.
Crystals are Niggli-reduced as CDVAE prepares them. Bad rows (unparseable CIF, partial occupancy,
unknown elements, too many atoms, zero volume, overlapping atoms) are skipped with their ids and
reasons counted and logged, and more than `max_dropped` of them is an error before any training.
The physical checks (volume, overlaps) apply to training data only: held-out and generated crystals
are read back as they are, so that their metrics see them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Composition, Element, Lattice, Structure
from torch import nn

from archipelago.domains.crystals import data, io, metrics
from archipelago.domains.crystals.lattice import log_stretch, stretch_matrix
from archipelago.domains.crystals.networks import CrystalNetConfig, CSPNet
from archipelago.experts.batch import Batch, Fields, FieldSpec
from archipelago.experts.conditions import Condition
from archipelago.experts.data import RaggedSamples
from archipelago.experts.domain import Domain
from archipelago.experts.paths import GaussianPath, MaskedPath, TorusPath

log = logging.getLogger(__name__)
LOG_S_LIMIT = 6.0  # |log S| entries past this (cells over 400 A) are clipped when decoding, so a cell is always built
MIN_SPREAD = 1e-2  # floor of the lattice entries' standard deviation (cubic cells have no off-diagonal spread)


class CrystalConfig(BaseModel):
    """Inputs, networks, and (once data is ingested) the fitted vocabulary and lattice scale."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_atoms: int = Field(20, ge=1)  # larger cells are dropped (and counted)
    max_dropped: float = Field(0.05, ge=0.0, le=1.0)  # share of input crystals that may be dropped
    niggli: bool = True  # Niggli-reduce every cell (CDVAE's preparation)
    primitive: bool = False  # reduce to the primitive cell first
    min_distance: float = Field(0.5, ge=0.0)  # training crystals with closer atoms (A) are dropped
    conditions: list[str] = []  # property columns used as continuous conditions (e.g. "heat_ref")
    prediction_share: float = Field(0.5, ge=0.0, le=1.0)  # training crystals whose atom types are given
    # The torus velocity's mean square is 1/12 per coordinate: x12 puts its loss on the scale of the
    # lattice's and the types' (unweighted, coordinates learned slowest: the types' loss is ~30x theirs).
    coordinate_weight: float = Field(12.0, gt=0.0)
    coverage: Literal["perov_5", "carbon_24", "mp_20"] = "perov_5"  # COV cutoffs (ANCHORS.md)
    id_column: str = "material_id"  # of CSV input
    cif_column: str = "cif"
    width: int = Field(128, ge=4)
    depth: int = Field(4, ge=1)
    frequencies: int = Field(16, ge=1)
    reveal_noise: bool = False  # the denoiser reads masked atom types' reveal noise (distill's few-step student)
    router_width: int = Field(64, ge=4)
    router_depth: int = Field(2, ge=1)
    elements: list[str] | None = None  # fitted: the element vocabulary, by atomic number
    lattice_mean: list[float] | None = None  # fitted: mean of the 6 log S entries
    lattice_std: list[float] | None = None  # fitted: their spread (floored at MIN_SPREAD)


class CrystalDomain(Domain):
    """Ordered periodic crystals with continuous property conditions."""

    name = "crystals"

    def __init__(self, config: CrystalConfig | dict[str, Any] | None = None, **overrides: Any):
        merged = {**(config.model_dump() if isinstance(config, CrystalConfig) else (config or {})), **overrides}
        self.config = CrystalConfig(**merged)

    @property
    def elements(self) -> list[str]:
        if not self.config.elements:
            raise ValueError("the crystal domain has no element vocabulary yet: ingest training data first")
        return self.config.elements

    @property
    def fields(self) -> Fields:
        return {"atom_type": FieldSpec(MaskedPath(len(self.config.elements or ["H", "He"])), index="atom_batch"),
                "frac_coords": FieldSpec(TorusPath(), index="atom_batch", weight=self.config.coordinate_weight),
                "lattice": FieldSpec(GaussianPath())}

    @property
    def conditions(self) -> dict[str, Condition]:
        return {name: Condition(name) for name in sorted(self.config.conditions)}

    # --- records ---------------------------------------------------------------------------------------

    def ingest(self, source: Any, fit: bool = True) -> pa.Table:
        """Read, canonicalize and check crystals (see the module docstring) as records. fit=True fits the
        element vocabulary and the lattice scale; fit=False reads with them."""
        c = self.config
        entries = io.read_crystals(source, properties=c.conditions, id_column=c.id_column, cif_column=c.cif_column)
        prepared = io.prepare(entries, max_atoms=c.max_atoms, elements=None if fit else self.elements,
                              niggli=c.niggli, primitive=c.primitive,
                              min_distance=c.min_distance if fit else 0.0, min_volume=0.1 if fit else 0.0)
        io.check_dropped(prepared, len(entries), c.max_dropped)
        kept = prepared.entries
        table = data.structures_to_table([e.structure for e in kept], [e.id for e in kept],
                                         {name: [e.properties.get(name) for e in kept] for name in c.conditions})
        if fit:
            self.config = self.config.model_copy(update=self._fitted(table))
        return table

    def _fitted(self, table: pa.Table) -> dict[str, Any]:
        symbols = {s for species in table.column("species").to_pylist() for s in species}
        entries = log_stretch(_matrices(table))
        return {"elements": sorted(symbols, key=lambda s: Element(s).Z),
                "lattice_mean": entries.mean(0).tolist(),
                "lattice_std": np.maximum(entries.std(0), MIN_SPREAD).tolist()}

    def samples(self, table: pa.Table) -> RaggedSamples:
        codes = {symbol: i for i, symbol in enumerate(self.elements)}
        species = [s for row in table.column("species").to_pylist() for s in row]
        coords = np.concatenate([np.asarray(row, dtype=np.float32) for row in table.column("frac_coords").to_pylist()]
                                or [np.zeros(0, np.float32)]).reshape(-1, 3)
        dense = {"lattice": torch.from_numpy(self._standardize(log_stretch(_matrices(table)))).float()}
        for name in self.conditions:
            values = table.column(name).to_pylist()
            dense[name] = torch.tensor([np.nan if v is None else float(v) for v in values], dtype=torch.float32)
        return RaggedSamples({"atom_type": torch.tensor([codes[s] for s in species], dtype=torch.long),
                              "frac_coords": torch.from_numpy(np.mod(coords, 1.0))},
                             sizes=torch.from_numpy(table.column("num_atoms").to_numpy().astype(np.int64)),
                             dense=dense, index="atom_batch")

    def _standardize(self, entries: np.ndarray) -> np.ndarray:
        return (entries - np.asarray(self.config.lattice_mean)) / np.asarray(self.config.lattice_std)

    def features(self, table: pa.Table) -> np.ndarray:
        return data.crystal_features(table, self.elements)

    def statistics(self, table: pa.Table) -> dict[str, list[float]]:
        return {"atoms": np.bincount(table.column("num_atoms").to_numpy()).astype(float).tolist()}

    def given_masks(self, batch: Batch, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """The atom types of a `prediction_share` of crystals given, so that the expert also learns
        structure prediction."""
        share = self.config.prediction_share
        if share <= 0:
            return {}
        atoms = batch["atom_batch"]
        b = int(atoms.max()) + 1 if len(atoms) else 0
        chosen = torch.rand(b, generator=generator, device=atoms.device) < share
        return {"atom_type": chosen[atoms]}

    # --- networks ------------------------------------------------------------------------------------

    def _net_config(self, **overrides: Any) -> CrystalNetConfig:
        return CrystalNetConfig(elements=len(self.elements), conditions=tuple(self.conditions.values()),
                                frequencies=self.config.frequencies, **overrides)

    def denoiser_network(self) -> nn.Module:
        return CSPNet(self._net_config(width=self.config.width, depth=self.config.depth,
                                       reveal_noise=self.config.reveal_noise))

    def router_network(self, num_experts: int) -> nn.Module:
        c = self.config
        return CSPNet(self._net_config(width=c.router_width, depth=c.router_depth, outputs=num_experts))

    # --- sampling ------------------------------------------------------------------------------------

    def template(self, n: int, generator: torch.Generator | None = None, statistics: dict | None = None,
                 given: Mapping[str, Any] | None = None) -> Batch:
        """n crystals' atoms: counts from the atom-count histogram, or from the given compositions."""
        _check_given(given or {})
        if given:
            sizes = torch.tensor([len(species) for species in self._given_species(given["atom_type"], n)])
        else:
            counts = (statistics or {}).get("atoms")
            if not counts or sum(counts) <= 0:
                raise ValueError("crystal templates need the atom-count histogram (statistics['atoms']) of a run")
            sizes = torch.multinomial(torch.tensor(counts, dtype=torch.float64), n, replacement=True,
                                      generator=generator)
        rows = int(sizes.sum())
        return {"atom_batch": torch.repeat_interleave(torch.arange(n), sizes),
                "atom_type": torch.zeros(rows, dtype=torch.long), "frac_coords": torch.zeros(rows, 3),
                "lattice": torch.zeros(n, 6)}

    def _given_species(self, value: Any, n: int) -> list[list[str]]:
        """Given compositions as one species list per crystal: a formula or Composition for every
        crystal, or a sequence of n formulas, Compositions or species lists."""
        if isinstance(value, (str, Composition)):
            return [_species(value)] * n
        items = list(value)
        if len(items) != n:
            raise ValueError(f"given field 'atom_type' needs one composition for every crystal or one for each of "
                             f"the {n}; got {len(items)}")
        return [_species(item) for item in items]

    def given_values(self, given: Mapping[str, Any], template: Batch) -> dict[str, torch.Tensor]:
        """Atom types given per crystal (structure prediction), as codes of the element vocabulary."""
        _check_given(given)
        if not given:
            return {}
        atoms = template["atom_batch"]
        n = int(atoms.max()) + 1 if len(atoms) else 0
        species = [s for crystal in self._given_species(given["atom_type"], n) for s in crystal]
        outside = sorted(set(species) - set(self.elements))
        if outside:
            raise ValueError(f"given elements {outside} are not in the run's vocabulary of {len(self.elements)} "
                             f"elements ({' '.join(self.elements)})")
        codes = {symbol: i for i, symbol in enumerate(self.elements)}
        return {"atom_type": torch.tensor([codes[s] for s in species], dtype=torch.long)}

    def decode(self, batch: Batch) -> list[Structure]:
        """Generated tensors as pymatgen Structures (Angstrom, fractional coordinates in [0, 1)), the
        conditions in `structure.properties`. Clipped lattice entries keep every cell buildable."""
        c, atoms = self.config, batch["atom_batch"].cpu()
        types = batch["atom_type"].cpu()
        if (types >= len(self.elements)).any():
            raise ValueError("some atom types are still masked: sample to t = 0 before decoding")
        entries = batch["lattice"].cpu().double().nan_to_num(0.0) * torch.tensor(c.lattice_std) + torch.tensor(
            c.lattice_mean)
        matrices = stretch_matrix(entries.clamp(-LOG_S_LIMIT, LOG_S_LIMIT)).numpy()
        coords = torch.remainder(batch["frac_coords"].cpu().double().nan_to_num(0.0), 1.0).numpy()
        sizes = torch.bincount(atoms, minlength=len(matrices)).tolist()
        starts = np.cumsum([0, *sizes])
        structures = []
        for b, matrix in enumerate(matrices):
            rows = slice(starts[b], starts[b + 1])
            species = [self.elements[i] for i in types[rows].tolist()]
            structure = Structure(Lattice(matrix), species, coords[rows], properties={"id": f"sample-{b}"})
            for name in self.conditions:
                if name in batch and not torch.isnan(batch[name][b]):
                    structure.properties[name] = float(batch[name][b])
            structures.append(structure)
        return structures

    def sample_records(self, batch: Batch) -> pa.Table:
        """Generated crystals as records (the Parquet format `ingest` reads back)."""
        structures = self.decode(batch)
        properties = {name: [s.properties.get(name) for s in structures] for name in self.conditions}
        return data.structures_to_table(structures, [s.properties["id"] for s in structures], properties)

    def evaluate(self, real: pa.Table, generated: Batch, **options: Any) -> dict[str, Any]:
        """CDVAE's generation metrics of ANCHORS.md against `real` (validity, COV-R/P, EMDs), and:
        `prediction=True`: the match rate and RMSE of sample i against real crystal i (structure
        prediction, one sample per real composition); `train` (a source or records with the property
        columns): a regressor per condition fitted on it, scoring the property of the samples against
        the condition they were drawn with. Other options: `n_valid` (1,000), `workers`, `progress`,
        `cache_dir` (the reference fingerprints), `seed`, `metrics` (the names to report)."""
        options.pop("repeats", None)
        names = options.pop("metrics", None)
        prediction = options.pop("prediction", False)
        train = options.pop("train", None)
        shared = {key: options.pop(key) for key in ("workers", "progress") if key in options}
        cache_dir, n_valid, seed = options.pop("cache_dir", None), options.pop("n_valid", 1000), options.pop("seed", 0)
        if options:
            raise ValueError(f"unknown evaluate options {sorted(options)}: choose from prediction, train, n_valid, "
                             f"workers, progress, cache_dir, seed, metrics")
        reference = data.table_to_structures(real)
        structures = self.decode(generated)
        reference_fps = metrics.cached_fingerprints(reference, cache_dir, **shared) if cache_dir else None
        generated_fps = metrics.fingerprints(structures, **shared)  # once, for coverage and the property
        scores = metrics.generation_metrics(structures, reference, dataset=self.config.coverage, n_valid=n_valid,
                                            seed=seed, reference_fps=reference_fps, generated_fps=generated_fps,
                                            **shared)
        if prediction:
            if len(structures) != len(reference):
                raise ValueError(f"prediction scores sample i against real crystal i: {len(structures)} samples for "
                                 f"{len(reference)} crystals")
            scores.update(metrics.match_rate_rmse(structures, reference, **shared))
        if train is not None:
            scores.update(self._property_scores(structures, generated_fps, generated, train, seed, shared))
        if names:
            unknown = sorted(set(names) - set(scores))
            if unknown:
                raise ValueError(f"unknown crystal metrics {unknown}; these were computed: {sorted(scores)}")
            scores = {name: scores[name] for name in names}
        return scores

    def _property_scores(self, structures: list[Structure], generated_fps: metrics.Fingerprints, generated: Batch,
                         train: Any, seed: int, shared: dict[str, Any]) -> dict[str, Any]:
        """Per condition drawn with values: a regressor fitted on `train` scores the samples' property.
        The training crystals are fingerprinted once for every condition."""
        drawn_names = [name for name in self.conditions
                       if name in generated and not torch.isnan(generated[name]).all()]
        if not drawn_names:
            return {}
        table = train if isinstance(train, pa.Table) else self.ingest(train, fit=False)
        training = data.table_to_structures(table)
        training_fps = metrics.fingerprints(training, **shared)
        scores: dict[str, Any] = {}
        for name in drawn_names:
            values = np.array([np.nan if v is None else v for v in table.column(name).to_pylist()], dtype=float)
            regressor = metrics.PropertyRegressor.fit(training, values, seed=seed, fps=training_fps)  # NaN: unused
            target = generated[name]
            drawn = (~torch.isnan(target)).numpy()
            chosen = [s for s, d in zip(structures, drawn.tolist(), strict=True) if d]
            found = metrics.property_metrics(chosen, target.numpy()[drawn], regressor,
                                             fps=generated_fps.take(np.flatnonzero(drawn)))
            scores.update({f"{name}_{key}": value for key, value in {**found, **regressor.report()}.items()})
        return scores

    def to_config(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CrystalDomain:
        return cls(config)


def _matrices(table: pa.Table) -> np.ndarray:
    """The lattice matrices of records, [N, 3, 3]."""
    return np.asarray(table.column("lattice").to_pylist(), dtype=np.float64).reshape(-1, 3, 3)


def _check_given(given: Mapping[str, Any]) -> None:
    unknown = sorted(set(given) - {"atom_type"})
    if unknown:
        raise ValueError(f"only atom_type can be given in the crystal domain (structure prediction); got {unknown}")


def _species(value: Any) -> list[str]:
    """A formula, Composition or species list as one crystal's species, element by element."""
    if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, str):
        return [str(Element(str(s))) for s in value]
    try:
        composition = Composition(value)
    except (ValueError, TypeError) as error:
        raise ValueError(f"given composition {value!r} is not a formula: {error}") from error
    species = []
    for element, amount in composition.items():
        if not float(amount).is_integer():
            raise ValueError(f"given composition {value!r} has a fractional amount of {element}")
        species += [str(element)] * int(amount)
    return species
