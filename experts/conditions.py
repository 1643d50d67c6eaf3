"""Conditions: per-sample context (a class, a property) with a null value meaning "unconditioned".

A domain declares its conditions; its records carry them and its batches hold one tensor per
condition under the condition's name ([B]): a categorical condition as class indices (long, null =
the number of classes), a continuous one as values in its units (float, null = NaN). Training drops
each condition to null with some probability, so one network learns p(x | c) and p(x) together, as
classifier-free guidance needs (Ho & Salimans 2022); the router may read them too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from archipelago.experts.batch import Batch


@dataclass(frozen=True)
class Condition:
    """One condition: categorical with its classes, or continuous with its units."""

    name: str
    classes: tuple[str, ...] | None = None  # categorical: the class names; None: continuous
    units: str = ""  # continuous: the units of its values (for messages and docs)

    @property
    def categorical(self) -> bool:
        return self.classes is not None

    @property
    def null(self) -> float | int:
        """The value that means "unconditioned"."""
        return len(self.classes) if self.categorical else math.nan

    @property
    def dtype(self) -> torch.dtype:
        return torch.long if self.categorical else torch.float32

    def encode(self, value: Any) -> float | int:
        """A user's value (a class name or index, a number, or None for null) as the tensor value. A number
        that is also a class name means that class, not that index."""
        if value is None:
            return self.null
        if self.categorical:
            if not isinstance(value, (str, bool)) and str(value) in self.classes:
                value = str(value)  # classes named by numbers (2..5 communities): 3 names class "3"
            if isinstance(value, str):
                if value not in self.classes:
                    raise ValueError(f"condition {self.name!r} has no class {value!r}; classes: {list(self.classes)}")
                return self.classes.index(value)
            if isinstance(value, bool) or not float(value).is_integer() or not 0 <= int(value) < len(self.classes):
                raise ValueError(f"condition {self.name!r}: {value!r} is not a class index in [0, {len(self.classes)})"
                                 f" nor one of {list(self.classes)}")
            return int(value)
        try:
            number = float(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"condition {self.name!r} is continuous ({self.units or 'no units'}): "
                             f"{value!r} is not a number") from error
        if not math.isfinite(number):
            raise ValueError(f"condition {self.name!r}: {value!r} is not finite (pass None for unconditioned)")
        return number

    def is_null(self, values: Tensor) -> Tensor:
        return values.isnan() if not self.categorical else values == self.null


Conditions = Mapping[str, Condition]


def condition_batch(conditions: Conditions, values: Mapping[str, Any], n: int) -> Batch:
    """Per-sample condition tensors [n] from a request: each value is one value for every sample or
    a sequence of n; conditions left out are null. Unknown names are an error naming them."""
    unknown = sorted(set(values) - set(conditions))
    if unknown:
        known = sorted(conditions) or "none: this domain takes no conditions"
        raise ValueError(f"unknown condition(s) {unknown}; the domain's conditions: {known}")
    out: Batch = {}
    for name, condition in sorted(conditions.items()):
        value = values.get(name)
        items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n
        if len(items) != n:
            raise ValueError(f"condition {name!r} has {len(items)} values for {n} samples (give one or {n})")
        out[name] = torch.tensor([condition.encode(item) for item in items], dtype=condition.dtype)
    return out


def null_conditions(batch: Batch, conditions: Conditions) -> Batch:
    """The batch with every condition set to null (the unconditional input of guidance)."""
    out = dict(batch)
    for name, condition in conditions.items():
        out[name] = torch.full_like(batch[name], condition.null)
    return out


def drop_conditions(batch: Batch, conditions: Conditions, probability: float,
                    generator: torch.Generator | None) -> Batch:
    """Each condition of each sample set to null with `probability` (independently per condition)."""
    if probability <= 0 or not conditions:
        return batch
    out = dict(batch)
    for name, condition in sorted(conditions.items()):
        value = batch[name]
        drop = torch.rand(value.shape, generator=generator, device=value.device) < probability
        out[name] = torch.where(drop, torch.full_like(value, condition.null), value)
    return out
