"""The contract a domain fulfils (images, time series, graphs, crystals, or a user's own).

A domain says how a user's data becomes Arrow records and back into the domain's own objects,
how records become tensors per field, which probability path each field follows, which denoiser
network and router backbone it provides, which features partition the data, and how samples are
scored. Domains never import Ray or MLflow; the layers above drive them.

Beyond that core, a domain may declare (each has a default that declares nothing):
- `conditions`: per-sample context with a null value, for classifier-free guidance;
- `layout`: variable-size levels besides its fields' own, and link tensors between them;
- `statistics`: additive per-partition counts (atoms or nodes per sample) that `template` draws
  from, saved with each expert so that the template is drawn after the expert is chosen;
- `given_masks` (training) and `given_values` (sampling): entries of fields fixed by the user;
- `codec_network`: a latent stage (an autoencoder) between records and the diffused fields;
- `sample_records`: generated samples as records that `ingest` reads back (sample files).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from archipelago.experts.batch import Batch, Fields, Layout
from archipelago.experts.conditions import Conditions
from archipelago.experts.data import Samples

Statistics = dict[str, list[float]]  # additive counts, e.g. {"atoms": [0, 0, 3, 5]}: samples per size


def merge_statistics(parts: Sequence[Statistics]) -> Statistics:
    """The statistics of the union of partitions: counts summed entry by entry (shorter lists padded)."""
    out: Statistics = {}
    for part in parts:
        for name, counts in part.items():
            total = out.setdefault(name, [])
            total.extend([0.0] * (len(counts) - len(total)))
            for i, count in enumerate(counts):
                total[i] += float(count)
    return out


class Domain(ABC):
    """One kind of data. Instances are rebuilt from `to_config()` by `type(self).from_config`."""

    name: ClassVar[str]

    @property
    @abstractmethod
    def fields(self) -> Fields:
        """The diffused fields and their probability paths."""

    @abstractmethod
    def ingest(self, source: Any, fit: bool = True) -> pa.Table:
        """Read a user's data into Arrow records. With fit=True the domain fits its state (such as a
        scaler, kept in its config) on this data; with fit=False it applies the state it has, as
        for held-out data."""

    @abstractmethod
    def samples(self, table: pa.Table) -> Samples:
        """Records as tensors per field."""

    @abstractmethod
    def features(self, table: pa.Table) -> np.ndarray:
        """Per-record features [N, F] used to partition the data into clusters."""

    @abstractmethod
    def denoiser_network(self) -> nn.Module:
        """A fresh expert network: forward(x_t: Batch, t: [B]) -> {field: output}."""

    @abstractmethod
    def router_network(self, num_experts: int) -> nn.Module:
        """A fresh router network: forward(x_t: Batch, t: [B]) -> logits [B, num_experts]."""

    @abstractmethod
    def template(self, n: int, generator: torch.Generator | None = None, statistics: Statistics | None = None,
                 given: Mapping[str, Any] | None = None) -> Batch:
        """A batch of n samples' shapes (and index tensors) from which the priors are drawn: sizes
        drawn from `statistics` (one partition's, or the merged ones), or set by `given` values."""

    @abstractmethod
    def decode(self, batch: Batch) -> Any:
        """Generated tensors back into the domain's own objects (in the user's units)."""

    @abstractmethod
    def evaluate(self, real: pa.Table, generated: Batch, **options: Any) -> dict[str, Any]:
        """The domain's quality metrics of generated samples against held-out records."""

    # --- what a domain may declare; the defaults declare nothing ------------------------------------

    @property
    def conditions(self) -> Conditions:
        """The conditions its records carry (batch keys: the condition names)."""
        return {}

    @property
    def layout(self) -> Layout:
        """Which variable-size level every ragged tensor of a batch lives on, and the link tensors."""
        return Layout.of(self.fields)

    def statistics(self, table: pa.Table) -> Statistics:
        """Additive per-partition counts that `template` draws sizes from."""
        return {}

    def given_masks(self, batch: Batch, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Training: which entries of a clean batch to treat as given (True), per field, so that an
        expert learns to complete partly given samples (forecasting, structure prediction)."""
        return {}

    def given_values(self, given: Mapping[str, Any], template: Batch) -> dict[str, torch.Tensor]:
        """Sampling: user-given values laid out like the template's fields, NaN (or -1 for
        categorical fields) where an entry is free. A dense field's value is one sample's shape
        (for every sample) or n samples'; errors name the field and the shapes."""
        out = {}
        for name, value in given.items():
            if name not in self.fields:
                raise ValueError(f"given field {name!r} is not a field of the {self.name} domain "
                                 f"(fields: {sorted(self.fields)})")
            like = template[name]
            array = torch.as_tensor(np.asarray(value, dtype=np.float64 if like.is_floating_point() else np.int64))
            if self.fields[name].index is None and tuple(array.shape) == tuple(like.shape[1:]):
                array = array.expand_as(like)
            if tuple(array.shape) != tuple(like.shape):
                raise ValueError(f"given field {name!r} has shape {tuple(array.shape)}; expected "
                                 f"{tuple(like.shape)} or {tuple(like.shape[1:])}")
            out[name] = array.to(like.dtype)
        return out

    def sample_records(self, batch: Batch) -> pa.Table | None:
        """Generated samples as records in the table format `ingest` reads back (what `sample --out
        X.parquet` writes for domains without DataFrames), or None where the domain has no such format."""
        return None

    def codec_network(self) -> nn.Module | None:
        """A fresh codec (autoencoder), or None: `encode(batch) -> latents`, `decode(latents) -> batch`,
        `loss(batch) -> scalar`, and `inputs`, the names of the record tensors it encodes. With a
        codec, `fields` are the latent fields (see `archipelago.experts.codec`)."""
        return None

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """A JSON-safe config, fitted state included, that rebuilds this domain."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> Domain:
        """The inverse of `to_config`."""
