"""An expert across an island: data-parallel training (DDP) of one expert with Ray Train.

An island is a group of machines. An expert whose placement has `workers` > 1 trains on that many
Ray Train workers (`ray.train.torch.TorchTrainer`), each reserving the placement's CPUs and GPUs and
placed on the island with the label selector {"island": name}. Ray Train starts the workers and sets
up torch.distributed among them (gloo on CPU, NCCL on GPU); every worker then runs the expert's step
(`steps.train_expert_step`), and `archipelago.experts.training` sees the process group and trains
with DistributedDataParallel: the global batch split over the workers, gradients averaged inside
the island, and nothing across islands. Rank 0 takes the expert's lease, writes the manifest, the
checkpoints and the metrics; the other ranks only read and compute.

Checkpoints: ours, written by rank 0 into the run directory, are the source of truth, and resuming
reads them; Ray Train's checkpointing is not used (nothing is reported to it). Ray Train keeps its
own run metadata under a storage path: a temporary local folder, deleted afterwards, so that
nothing of it enters the run directory (which may be an object store).

Failures: a worker whose process or node died restarts the whole worker group, which resumes from
the latest checkpoint, up to `max_retries` times (as a Ray task is retried); an exception raised by
the training itself is not retried (it would fail again) and comes back as `DataParallelError`
naming the expert and each failing rank. Written for Ray Train V2, the default of Ray 2.60
(RAY_TRAIN_V2_ENABLED unset or 1), whose result carries rank 0's return value.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import ray.train
from ray.exceptions import RayActorError
from ray.train.torch import TorchTrainer

from archipelago.platform import steps
from archipelago.platform.config import Placement

logger = logging.getLogger("archipelago.data_parallel")


class DataParallelError(RuntimeError):
    """The data-parallel training of an expert failed; `failures` maps each failing rank to its error."""

    def __init__(self, k: int, workers: int, failures: dict[int, BaseException]) -> None:
        details = "; ".join(f"rank {rank}: {type(error).__name__}: {error}" for rank, error in sorted(failures.items()))
        super().__init__(f"expert {k}: data-parallel training on {workers} workers failed ({details})")
        self.failures = failures


def scaling_config(placement: Placement, island: str | None) -> ray.train.ScalingConfig:
    """Ray Train's workers for a placement: `workers` of them, each with its CPUs and GPUs, on `island`."""
    resources = {"CPU": placement.num_cpus} | ({"GPU": placement.num_gpus} if placement.num_gpus else {})
    return ray.train.ScalingConfig(num_workers=placement.workers, use_gpu=placement.num_gpus > 0,
                                   resources_per_worker=resources,
                                   label_selector={"island": island} if island is not None else None)


def train_expert(run_dir: str, k: int, island: str | None, lead: Callable[[], Any], max_retries: int = 3) -> Any:
    """Train (or resume) expert k of the run in `run_dir` on its placement's workers on `island`.
    Rank 0 runs `lead()`, which must call `steps.train_expert_step` for expert k (tracked as the
    caller wishes, and waiting for the expert's lease as it wishes); the other ranks call
    `steps.train_expert_step` themselves. Returns what `lead` returned."""
    if not TorchTrainer.__module__.startswith("ray.train.v2"):
        raise RuntimeError("data-parallel experts need Ray Train V2: unset RAY_TRAIN_V2_ENABLED or set it to 1")
    placement = steps.load_config(run_dir).placement_of(k)
    config, restarts = {"run_dir": run_dir, "k": k, "lead": lead}, 0
    while True:
        try:
            return _fit(config, scaling_config(placement, island), f"expert-{k}")
        except ray.train.WorkerGroupError as error:
            if not any(map(_died, error.worker_failures.values())) or restarts == max_retries:
                raise DataParallelError(k, placement.workers, error.worker_failures) from error
            restarts += 1
            logger.warning("expert %d: a data-parallel worker died (%s); restarting the %d workers from the latest "
                           "checkpoint (%d of %d)", k, error, placement.workers, restarts, max_retries)


def _died(error: BaseException) -> bool:
    """Whether a worker's error says its process or node died. Ray Train V2 reports a dead worker as a
    failed health check whose `health_check_failure` is Ray's RayActorError; the check's class is
    private to Ray Train, so only that attribute is read, here alone."""
    return isinstance(error, RayActorError) or isinstance(getattr(error, "health_check_failure", None), RayActorError)


def _fit(config: dict[str, Any], scaling: ray.train.ScalingConfig, name: str) -> Any:
    """One run of the worker group; rank 0's return value."""
    storage = tempfile.mkdtemp(prefix="archipelago-ray-train-")
    try:
        run = ray.train.RunConfig(storage_path=storage, name=f"{name}-{uuid.uuid4().hex[:8]}",
                                  failure_config=ray.train.FailureConfig(max_failures=0),
                                  logging_config=ray.train.LoggingConfig(log_level="WARNING"))
        trainer = TorchTrainer(_per_worker, train_loop_config=config, scaling_config=scaling, run_config=run)
        return trainer.fit().return_value
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def _per_worker(config: dict[str, Any]) -> Any:
    """Each Ray Train worker's loop (torch.distributed is set up): rank 0 leads, the others compute."""
    if ray.train.get_context().get_world_rank() == 0:
        return config["lead"]()
    steps.train_expert_step(config["run_dir"], config["k"])
    return None
