"""Batches: a mapping from field name to tensor, plus the index tensors of variable-size fields.

A dense field has one row per sample ([B, ...]). A variable-size (ragged) field stacks the rows
of all samples ([R, ...]) and names an index tensor in the batch that gives each row's sample
(as PyG's `batch` vector does). Any other tensor in the batch is per-sample context ([B, ...]).
Field names are sorted wherever order matters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from archipelago.experts.paths import ProbabilityPath

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class FieldSpec:
    """A diffused field: its probability path and, for variable-size fields, its index tensor."""

    path: ProbabilityPath
    index: str | None = None  # name of the [R] tensor mapping rows to samples; None for dense fields


Fields = Mapping[str, FieldSpec]


def num_samples(batch: Batch, fields: Fields) -> int:
    """The number of samples B in a batch."""
    for name in sorted(fields):
        spec = fields[name]
        if spec.index is None:
            return batch[name].shape[0]
    index = batch[fields[sorted(fields)[0]].index]
    return int(index.max().item()) + 1 if index.numel() else 0


def per_row(values: Tensor, batch: Batch, spec: FieldSpec) -> Tensor:
    """Lay a per-sample tensor [B, ...] out over the rows of a field."""
    return values if spec.index is None else values[batch[spec.index]]


def index_names(fields: Fields) -> set[str]:
    return {spec.index for spec in fields.values() if spec.index is not None}


def select(batch: Batch, fields: Fields, ids: Tensor) -> tuple[Batch, dict[str, Tensor]]:
    """The sub-batch of the samples `ids` (renumbered 0..len(ids)-1), and for every field the
    positions of its selected rows in the full batch."""
    indices = index_names(fields)
    rows: dict[str, Tensor] = {}
    sub: Batch = {}
    remap = torch.full((num_samples(batch, fields),), -1, dtype=torch.long, device=ids.device)
    remap[ids] = torch.arange(len(ids), device=ids.device)
    for name in indices:
        keep = torch.nonzero(remap[batch[name]] >= 0).squeeze(1)
        rows[name] = keep
        sub[name] = remap[batch[name][keep]]
    for name, value in batch.items():
        if name in indices:
            continue
        spec = fields.get(name)
        if spec is not None and spec.index is not None:
            sub[name] = value[rows[spec.index]]
        else:
            sub[name] = value[ids]
    field_rows = {name: ids if spec.index is None else rows[spec.index] for name, spec in fields.items()}
    return sub, field_rows


def with_fields(context: Batch, fields: Fields, values: Mapping[str, Tensor]) -> Batch:
    """A batch with the diffused fields replaced by `values` and everything else kept."""
    out = dict(context)
    out.update({name: values[name] for name in fields})
    return out
