"""Batches: a mapping from tensor name to tensor, laid out per sample or over variable-size levels.

A dense tensor has one row per sample ([B, ...]). A variable-size (ragged) *level*, such as the
atoms of crystals, the nodes of graphs or the edges between those nodes, stacks the rows of all
samples ([R, ...]) and has an index tensor ([R]) that gives each row's sample, as PyG's `batch`
vector does. A batch may hold several levels at once; a *link* tensor holds row numbers of another
level (an edge's two node rows), and is renumbered whenever samples are selected or concatenated,
as PyG's `__inc__` does.

Why ragged and not dense with padding masks: the samples of one data set differ widely in size
(crystals of 5 to 20 atoms, graphs of 12 to 187 nodes), so padding wastes most of the work and
every loss, path and metric would have to honour a mask; with ragged levels nothing is padded and
no mask is ever needed. Pairwise quantities (edges) are a level of their own whose rows are the
unordered node pairs {i < j} of each sample, so an adjacency stays symmetric by construction.

`Layout` says which level every ragged tensor lives on and which tensors are links; any tensor it
does not name is per-sample (dense fields, conditions, per-sample context). Field names are sorted
wherever order matters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from archipelago.experts.paths import ProbabilityPath

Batch = dict[str, Tensor]
GIVEN_SUFFIX = ":given"  # "<field>:given" is the mask of a field's entries given by the user
NOISE_SUFFIX = ":noise"  # "<field>:noise" is a field's paired noise end x_1 (reflow's pairs)
REVEAL_SUFFIX = ":reveal"  # "<field>:reveal" is a discrete field's reveal noise (see MaskedPath.reveal_noise)


@dataclass(frozen=True)
class FieldSpec:
    """A diffused field: its probability path and, for variable-size fields, its index tensor."""

    path: ProbabilityPath
    index: str | None = None  # name of the [R] tensor mapping rows to samples; None for dense fields
    weight: float = 1.0  # the field's weight in the training loss (fields whose losses differ in scale)


Fields = Mapping[str, FieldSpec]


def given_key(name: str) -> str:
    """The batch key of the mask of field `name`'s given entries."""
    return f"{name}{GIVEN_SUFFIX}"


def noise_key(name: str) -> str:
    """The batch key of field `name`'s paired noise (laid out like the field)."""
    return f"{name}{NOISE_SUFFIX}"


def reveal_key(name: str) -> str:
    """The batch key of field `name`'s reveal noise (laid out like the field, one more trailing dim)."""
    return f"{name}{REVEAL_SUFFIX}"


@dataclass(frozen=True)
class Layout:
    """Where the tensors of a batch live (see the module docstring)."""

    rows: Mapping[str, str] = field(default_factory=dict)  # ragged tensor -> index tensor of its level
    links: Mapping[str, str] = field(default_factory=dict)  # link tensor -> index of the level it numbers

    @classmethod
    def of(cls, fields: Fields, rows: Mapping[str, str] | None = None,
           links: Mapping[str, str] | None = None) -> Layout:
        """The layout of a domain's fields plus its other ragged tensors and links."""
        ragged = {name: spec.index for name, spec in fields.items() if spec.index is not None}
        return cls(rows={**ragged, **(rows or {})}, links=dict(links or {}))

    @property
    def indices(self) -> set[str]:
        return set(self.rows.values()) | set(self.links.values())

    def level_of(self, name: str) -> str | None:
        """The index tensor of the level a tensor lives on (None: per sample)."""
        for suffix in (GIVEN_SUFFIX, NOISE_SUFFIX, REVEAL_SUFFIX):
            name = name.removesuffix(suffix)
        return self.rows.get(name)


def as_layout(spec: Layout | Fields) -> Layout:
    return spec if isinstance(spec, Layout) else Layout.of(spec)


def num_samples(batch: Batch, spec: Layout | Fields) -> int:
    """The number of samples B in a batch: from the index tensors of its levels where there are any
    (fields alone may not name every level: a graph's node index is no field's index when only its
    pairs are diffused, and would pass for a per-sample tensor), else from a per-sample tensor."""
    layout = as_layout(spec)
    counts = [int(batch[index].max().item()) + 1 for index in sorted(layout.indices)
              if index in batch and batch[index].numel()]
    if counts:
        return max(counts)
    for name in sorted(batch):
        if name not in layout.indices and layout.level_of(name) is None:
            return batch[name].shape[0]
    return 0


def per_row(values: Tensor, batch: Batch, spec: FieldSpec) -> Tensor:
    """Lay a per-sample tensor [B, ...] out over the rows of a field."""
    return values if spec.index is None else values[batch[spec.index]]


def index_names(fields: Fields) -> set[str]:
    return {spec.index for spec in fields.values() if spec.index is not None}


def select(batch: Batch, spec: Layout | Fields, ids: Tensor) -> tuple[Batch, dict[str, Tensor]]:
    """The sub-batch of the samples `ids`, in that order (renumbered 0..len(ids)-1, links renumbered
    to the kept rows), and for every tensor the positions of its selected rows in the full batch."""
    layout = as_layout(spec)
    remap = torch.full((num_samples(batch, layout),), -1, dtype=torch.long, device=ids.device)
    remap[ids] = torch.arange(len(ids), device=ids.device)
    kept: dict[str, Tensor] = {}  # per level: its selected rows, grouped by new sample
    renumber: dict[str, Tensor] = {}  # per level: old row -> new row
    sub: Batch = {}
    for index in sorted(layout.indices):
        new_sample = remap[batch[index]]
        rows = torch.nonzero(new_sample >= 0).squeeze(1)
        rows = rows[torch.argsort(new_sample[rows], stable=True)]
        kept[index], sub[index] = rows, new_sample[rows]
        renumber[index] = torch.full_like(batch[index], -1)
        renumber[index][rows] = torch.arange(len(rows), device=rows.device)
    positions: dict[str, Tensor] = {}
    for name, value in batch.items():
        if name in layout.indices:
            continue
        level = layout.level_of(name)
        positions[name] = ids if level is None else kept[level]
        sub[name] = value[positions[name]]
        if name in layout.links:
            sub[name] = renumber[layout.links[name]][sub[name]]
    return sub, positions


def concat(parts: Sequence[Batch], spec: Layout | Fields) -> Batch:
    """Concatenate batches sample-wise, shifting index tensors by samples and links by rows."""
    layout = as_layout(spec)
    sample_offset, row_offset = 0, dict.fromkeys(layout.indices, 0)
    pieces: dict[str, list[Tensor]] = {name: [] for name in parts[0]}
    for part in parts:
        for name, value in part.items():
            if name in layout.indices:
                value = value + sample_offset
            elif name in layout.links:
                value = value + row_offset[layout.links[name]]
            pieces[name].append(value)
        sample_offset += num_samples(part, layout)
        for index in layout.indices:
            row_offset[index] += part[index].shape[0]
    return {name: torch.cat(values) for name, values in pieces.items()}


def with_fields(context: Batch, fields: Fields, values: Mapping[str, Tensor]) -> Batch:
    """A batch with the diffused fields replaced by `values` and everything else kept."""
    out = dict(context)
    out.update({name: values[name] for name in fields})
    return out
