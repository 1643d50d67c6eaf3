"""The assembled ensemble as an MLflow pyfunc model, in the models-from-code form.

`archipelago.platform.tracking.log_ensemble_model` logs this file as the model's code, with a copy
of the run directory's sampling files as the artifact "run". MLflow runs this file when the model
is loaded; `load_context` rebuilds the run from the copy, and `predict` samples:

    model = mlflow.pyfunc.load_model("models:/stocks/1")
    windows = model.predict({"n": 16, "strategy": "top1"})      # numpy array, e.g. [16, L, C]

The request is a dict (or a one-row pandas DataFrame) with the keys of `DEFAULTS` plus `n`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from archipelago.experts.solvers import SOLVERS
from archipelago.platform import sdk
from archipelago.platform.tracking import MODEL_ARTIFACT
from archipelago.router.ensemble import Strategy

DEFAULTS: dict[str, Any] = {"strategy": "top1", "solver": "heun", "steps": 50, "seed": 0, "top_k": 2}
INTEGER_KEYS = ("n", "steps", "seed", "top_k")


def parse_request(model_input: Any, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sampling settings of one request, defaults filled in; errors name the bad key or value."""
    request = _as_dict(model_input) | dict(params or {})
    unknown = sorted(set(request) - set(DEFAULTS) - {"n"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; a request takes n and {sorted(DEFAULTS)}")
    if "n" not in request:
        raise ValueError("the request needs n, the number of samples, e.g. {'n': 16, 'strategy': 'top1'}")
    settings = DEFAULTS | request
    for key in INTEGER_KEYS:
        settings[key] = _integer(key, settings[key])
    if settings["strategy"] not in {s.value for s in Strategy}:
        raise ValueError(f"unknown strategy {settings['strategy']!r}; choose one of {[s.value for s in Strategy]}")
    if settings["solver"] not in SOLVERS:
        raise ValueError(f"unknown solver {settings['solver']!r}; choose one of {sorted(SOLVERS)}")
    return settings


def _as_dict(model_input: Any) -> dict[str, Any]:
    if isinstance(model_input, pd.DataFrame):
        if len(model_input) != 1:
            raise ValueError(f"a DataFrame request must have one row, got {len(model_input)}")
        return {str(k): _scalar(v) for k, v in model_input.iloc[0].items()}
    if isinstance(model_input, Mapping):
        return {str(k): _scalar(v) for k, v in model_input.items()}
    raise TypeError(f"a request is a dict or a one-row DataFrame, got {type(model_input).__name__}")


def _scalar(value: Any) -> Any:
    """A plain Python value from a numpy scalar or a one-element list/array (as MLflow may pass)."""
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == 1:
        value = value[0]
    return value.item() if isinstance(value, np.generic) else value


def _integer(key: str, value: Any) -> int:
    try:
        whole = not isinstance(value, bool) and float(value).is_integer()
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(value)


def as_array(items: Any) -> np.ndarray:
    """The domain's decoded items as a numpy array (a 1-d object array when they are not arrays)."""
    if isinstance(items, np.ndarray):
        return items
    out = np.empty(len(items), dtype=object)
    out[:] = list(items)
    return out


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """Experts plus router of one run; `predict` generates samples with a routing strategy."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.run = sdk.load(context.artifacts[MODEL_ARTIFACT])

    # `model_input` has no type hint on purpose: MLflow reads predict's hints as an input schema
    # (and warns unless it is list[...]); requests are checked by `parse_request` instead.
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        settings = parse_request(model_input, params)
        return as_array(self.run.sample(**settings).items)


mlflow.models.set_model(EnsembleModel())
