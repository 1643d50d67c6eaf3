"""The assembled ensemble as an MLflow pyfunc model, in the models-from-code form.

`archipelago.platform.tracking.log_ensemble_model` logs this file as the model's code, with a copy
of the run directory's sampling files as the artifact "run". MLflow runs this file when the model
is loaded; `load_context` rebuilds the run from the copy, and `predict` samples:

    model = mlflow.pyfunc.load_model("models:/stocks/1")
    windows = model.predict({"n": 16, "strategy": "sample"})      # numpy array, e.g. [16, L, C]

The request is a dict (or a one-row pandas DataFrame) of SampleRequest fields, `n` required, e.g.
{"n": 16, "conditions": {"family": "cycle"}, "guidance": 2.0}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pydantic

from archipelago.platform import sdk
from archipelago.platform.config import describe
from archipelago.platform.tracking import MODEL_ARTIFACT
from archipelago.router.sampling import SampleRequest


def parse_request(model_input: Any, params: Mapping[str, Any] | None = None) -> SampleRequest:
    """The SampleRequest of one request (its defaults fill the rest); errors name the bad key or value."""
    request = _as_dict(model_input) | dict(params or {})
    if "n" not in request:
        raise ValueError("the request needs n, the number of samples, e.g. {'n': 16, 'strategy': 'sample'}")
    try:
        return SampleRequest(**request)
    except pydantic.ValidationError as error:
        raise ValueError(f"bad request: {describe(error)}") from error


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
        return as_array(self.run.sample(parse_request(model_input, params)).items)


mlflow.models.set_model(EnsembleModel())
