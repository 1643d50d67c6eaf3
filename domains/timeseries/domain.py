"""The time-series domain: multichannel windows as one Gaussian field "x" [B, L, C].

Follows the benchmark recipe of TimeGAN / Diffusion-TS / PaD-TS: a per-channel min-max scaler is
fitted on the raw series, the scaled series is cut into windows (24 steps, stride 1 by default),
experts learn windows in [0, 1], and decoding undoes the scaling. The scaler is part of the
domain's config, so it is saved with the run and restored on load.

Sources: a .csv or .parquet path, a DataFrame, a 2-D array [T, C] (a series), a 3-D array
[N, L, C] (windows, scaled per channel over all their values), or "sines" / "sines:N" for the
generated Sines set (N windows, 10,000 by default; already in [0, 1], so the scaler is identity).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from archipelago.domains.timeseries import data, metrics
from archipelago.domains.timeseries.networks import (
    DenoiserConfig,
    RouterConfig,
    TimeSeriesDenoiser,
    TimeSeriesRouterNet,
)
from archipelago.domains.timeseries.paths import FourierGaussianPath
from archipelago.experts.batch import Batch, Fields, FieldSpec
from archipelago.experts.data import DenseSamples
from archipelago.experts.domain import Domain
from archipelago.experts.paths import GaussianPath

SINES = "sines"


def _is_sines(source: Any) -> bool:
    return isinstance(source, str) and source.split(":")[0] == SINES


class TimeSeriesConfig(BaseModel):
    """Windowing, networks, and (once data is ingested) the fitted scaler."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window: int = Field(24, ge=2)  # L, time steps per window
    stride: int = Field(1, ge=1)  # steps between window starts
    columns: list[str] | None = None  # channels to read; None: every numeric column
    width: int = Field(64, ge=4)  # denoiser token width
    depth: int = Field(3, ge=1)  # denoiser transformer blocks
    heads: int = Field(4, ge=1)  # attention heads (denoiser and router)
    router_width: int = Field(48, ge=4)  # router token width
    router_depth: int = Field(2, ge=1)  # router transformer blocks
    fourier_weight: float = Field(0.0, ge=0)  # Diffusion-TS's Fourier-domain loss term (0: off; paths.py)
    scaler: dict[str, list] | None = None  # fitted MinMaxScaler (set by ingest)


class TimeSeriesDomain(Domain):
    """Windows of a multichannel series."""

    name = "timeseries"

    def __init__(self, config: TimeSeriesConfig | dict[str, Any] | None = None, **overrides: Any):
        merged = {**(dict(config) if isinstance(config, TimeSeriesConfig) else (config or {})), **overrides}
        self.config = TimeSeriesConfig(**merged)

    @property
    def scaler(self) -> data.MinMaxScaler:
        if self.config.scaler is None:
            raise RuntimeError("the time-series domain has no scaler yet: ingest data first")
        return data.MinMaxScaler.from_dict(self.config.scaler)

    @property
    def channels(self) -> int:
        return len(self.scaler.columns)

    @property
    def fields(self) -> Fields:
        path = FourierGaussianPath(self.config.fourier_weight) if self.config.fourier_weight else GaussianPath()
        return {"x": FieldSpec(path)}

    def ingest(self, source: Any, fit: bool = True) -> pa.Table:
        """Read, scale and window a user's series. fit=True fits the scaler on this data and keeps it
        in the config; fit=False scales with the scaler already fitted (held-out data)."""
        raw, columns = self._raw(source, fit)
        if fit:
            scaler = self._identity(columns) if _is_sines(source) else data.MinMaxScaler.fit(raw, columns)
            self.config = self.config.model_copy(update={"scaler": scaler.to_dict()})
        scaled = self.scaler.transform(raw)
        if scaled.ndim == 3:
            return data.windows_to_table(scaled)
        name = str(source) if isinstance(source, (str, Path)) else None
        return data.windows_to_table(data.sliding_windows(scaled, self.config.window, self.config.stride, name=name))

    def _raw(self, source: Any, fit: bool = True) -> tuple[np.ndarray, list[str]]:
        """The raw series [T, C] or windows [N, L, C] of a source, and its channel names. Data for a
        fitted domain (`fit=False`) is matched to the scaler's columns by name: reordered columns
        are fine, missing or extra ones are an error naming them."""
        if _is_sines(source):
            count = int(source.split(":", 1)[1]) if ":" in source else 10_000
            windows = data.sines(count, length=self.config.window)
            return windows, [f"sine{i}" for i in range(windows.shape[2])]
        if isinstance(source, np.ndarray) and source.ndim == 3:
            if source.shape[1] != self.config.window:
                raise ValueError(f"windows have length {source.shape[1]}, the domain's window is {self.config.window}")
            if not np.isfinite(source).all():
                raise ValueError("windows contain NaN or infinite values")
            if not fit and source.shape[2] != self.channels:
                raise ValueError(f"windows have {source.shape[2]} channels, the run has {self.channels} "
                                 f"({list(self.scaler.columns)})")
            return source.astype(np.float64), self.config.columns or [f"c{i}" for i in range(source.shape[2])]
        if fit:
            frame = data.read_frame(source, self.config.columns)
        elif isinstance(source, np.ndarray):  # no names: the run's columns in order
            frame = data.read_frame(self._named(source))
        else:
            frame = data.read_frame(source, list(self.scaler.columns), only=True)
        return frame.to_numpy(), list(frame.columns)

    def _named(self, series: np.ndarray) -> pd.DataFrame:
        """A series [T, C] (or [T]) without column names as a frame with the run's columns."""
        series = series.reshape(len(series), -1) if series.ndim == 1 else series
        if series.ndim != 2 or series.shape[1] != self.channels:
            raise ValueError(f"a series of shape {series.shape} does not have the run's {self.channels} channels "
                             f"({list(self.scaler.columns)})")
        return pd.DataFrame(series, columns=list(self.scaler.columns))

    @staticmethod
    def _identity(columns: list[str]) -> data.MinMaxScaler:
        return data.MinMaxScaler((0.0,) * len(columns), (1.0,) * len(columns), tuple(columns))

    def samples(self, table: pa.Table) -> DenseSamples:
        return DenseSamples({"x": torch.from_numpy(data.table_to_windows(table).copy())})

    def features(self, table: pa.Table) -> np.ndarray:
        return data.window_features(data.table_to_windows(table))

    def denoiser_network(self) -> nn.Module:
        c = self.config
        return TimeSeriesDenoiser(DenoiserConfig(self.channels, c.window, c.width, c.depth, c.heads))

    def router_network(self, num_experts: int) -> nn.Module:
        c = self.config
        return TimeSeriesRouterNet(RouterConfig(self.channels, c.window, num_experts, c.router_width,
                                                c.router_depth, c.heads))

    def template(self, n: int, generator: torch.Generator | None = None, statistics: dict | None = None,
                 given: dict | None = None) -> Batch:
        return {"x": torch.zeros(n, self.config.window, self.channels)}

    def given_values(self, given: Mapping[str, Any], template: Batch) -> dict[str, torch.Tensor]:
        """Forecasting and imputation: `x` given in the user's units, one window [L, C] for every
        sample or [n, L, C], NaN where the window is free; scaled here like the records."""
        scaled = {name: self.scaler.transform(np.asarray(value, dtype=np.float64)) if name == "x" else value
                  for name, value in given.items()}
        return super().given_values(scaled, template)

    def decode(self, batch: Batch) -> np.ndarray:
        """Generated windows [n, L, C] in the user's original units."""
        return self.scaler.inverse_transform(self.scaled(batch))

    def decode_frames(self, batch: Batch) -> list[pd.DataFrame]:
        """Generated windows as DataFrames with the original column names and units."""
        return [pd.DataFrame(window, columns=list(self.scaler.columns)) for window in self.decode(batch)]

    @staticmethod
    def scaled(batch: Batch) -> np.ndarray:
        """Generated windows in the scaled space [0, 1], where the metrics are defined."""
        return batch["x"].detach().cpu().double().clamp(0, 1).numpy()

    def evaluate(self, real: pa.Table, generated: Batch, **options: Any) -> dict[str, Any]:
        """Context-FID, correlational, discriminative, predictive, VDS and FDDS (ANCHORS.md), in [0, 1] units."""
        return self.evaluate_windows(data.table_to_windows(real), self.scaled(generated), **options)

    @staticmethod
    def evaluate_windows(real: np.ndarray, generated: np.ndarray, **options: Any) -> dict[str, Any]:
        """The metrics of scaled windows [N, L, C] against scaled windows."""
        return metrics.evaluate(np.asarray(real, dtype=np.float64), np.asarray(generated, dtype=np.float64), **options)

    def to_config(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TimeSeriesDomain:
        return cls(config)
