"""The contract a domain fulfils (images, time series, graphs, crystals, or a user's own).

A domain says how a user's data becomes Arrow records and back into the domain's own objects,
how records become tensors per field, which probability path each field follows, which denoiser
network and router backbone it provides, which features partition the data, and how samples are
scored. Domains never import Ray or MLflow; the layers above drive them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from archipelago.experts.batch import Batch, Fields
from archipelago.experts.data import Samples


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
    def template(self, n: int, generator: torch.Generator | None = None) -> Batch:
        """A batch of n samples' shapes (and index tensors) from which the priors are drawn."""

    @abstractmethod
    def decode(self, batch: Batch) -> Any:
        """Generated tensors back into the domain's own objects (in the user's units)."""

    @abstractmethod
    def evaluate(self, real: pa.Table, generated: Batch, **options: Any) -> dict[str, Any]:
        """The domain's quality metrics of generated samples against held-out records."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """A JSON-safe config, fitted state included, that rebuilds this domain."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> Domain:
        """The inverse of `to_config`."""
