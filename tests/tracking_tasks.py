"""A Ray task for tests/test_tracking.py: one child run inside a worker (workers import it from tests/)."""

from __future__ import annotations

import os
from typing import Any

import mlflow

from archipelago.platform.tracking import ChildRun, resolve_tracking_uri


def child_run_task(parent_id: str, name: str) -> dict[str, Any]:
    """Log one child run under `parent_id` to the store named by the worker's MLFLOW_TRACKING_URI."""
    uri = resolve_tracking_uri(None)
    active_before = mlflow.active_run()
    with ChildRun(uri, parent_id, name, {"expert": name}) as child:
        child.log(1, {"loss": 1.0, "lr": 0.1})
        child.log(2, {"loss": 0.5, "lr": 0.1})
    return {
        "uri": uri,
        "pid": os.getpid(),
        "run_id": child.run_id,
        "active_before": None if active_before is None else active_before.info.run_id,
        "active_after": None if (run := mlflow.active_run()) is None else run.info.run_id,
    }
