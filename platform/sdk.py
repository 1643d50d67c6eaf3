"""The Python SDK: fit K experts and a router on your data, load the run anywhere, sample, evaluate.

    from archipelago.platform import sdk

    run = sdk.fit("stock_data.csv", "runs/stocks", experts=4, expert={"steps": 2000})
    run = sdk.load("runs/stocks")                      # in any later process
    out = run.sample(1000, strategy="top1", solver="heun", steps=50)   # any SampleRequest fields
    scores = run.evaluate(out)                          # against the run's own records by default

`fit` runs the steps of `archipelago.platform.steps`, each resumable, in this process and
untracked unless asked (`ray=`, `tracking=`; `runner.Launch` says why the command line defaults
differ); then neither Ray nor MLflow is imported. Sampling takes one `SampleRequest`, whose fields
and defaults are shared with the command line and the MLflow model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor

from archipelago.domains import domain_reference
from archipelago.experts.batch import Batch
from archipelago.experts.domain import Domain
from archipelago.platform import distill, modules, runner, steps
from archipelago.platform.config import RunConfig, on_device
from archipelago.platform.runner import Launch
from archipelago.router.sampling import SampleRequest, check_device, check_request


@dataclass(frozen=True)
class Samples:
    """Generated samples: the domain's objects, the raw tensors, their cost, and their experts.
    (`archipelago.platform.sample_files` writes them to files and reads them back.)"""

    items: Any  # the domain's own objects (arrays in user units, structures, graphs, ...)
    batch: Batch  # the tensors the domain metrics read
    strategy: str
    expert_calls_per_sample: float
    router_calls_per_sample: float
    assignment: Tensor | None = None  # [n] the expert of each sample (per-trajectory strategies: sample, oracle)
    attribution: Tensor | None = None  # [n, K] each expert's routing weight averaged along the trajectory
    expert_ids: list[int] | None = None  # the run's expert id of each column of `attribution`
    trace: Tensor | None = None  # [n, calls] each sample's main expert (a position in expert_ids) at every call


class Run:
    """A fitted (or partly fitted) run directory."""

    def __init__(self, run_dir: str, version: int | None = None):
        self.run_dir, self.version = str(run_dir), version
        self.config = steps.load_config(self.run_dir)
        self.domain = steps.load_domain(self.run_dir)
        self._ensembles: dict[tuple[torch.device, str], steps.LoadedEnsemble] = {}

    @property
    def ensemble(self) -> steps.LoadedEnsemble:
        """The assembled ensemble on the default device (CUDA when present, else CPU)."""
        return self._ensemble_on(check_device(None))

    def _ensemble_on(self, device: torch.device, model: str = "ensemble") -> steps.LoadedEnsemble:
        """The ensemble (or one of its students, `model` as in SampleRequest) on `device`, loaded once."""
        if (device, model) not in self._ensembles:
            self._ensembles[device, model] = (
                steps.load_ensemble(self.run_dir, device, self.version) if model == "ensemble"
                else distill.load_student(self.run_dir, model, device))
        return self._ensembles[device, model]

    def request(self, n: int | SampleRequest | None = None, **settings: Any) -> SampleRequest:
        """A sampling request, checked against this run before any sampling work.

        `n` and `settings` are SampleRequest fields (its defaults fill the rest), or `n` is a whole
        SampleRequest. A bad field raises pydantic's ValidationError, a request this run cannot
        serve (an unknown condition, guidance without conditions, ...) a ValueError naming it.
        """
        request = _as_request(n, settings)
        e = self._ensemble_on(check_device(request.device), request.model)
        check_request(e.domain, request, e.router, e.cluster_sizes, len(e.experts))
        return request

    def sample(self, n: int | SampleRequest | None = None, **settings: Any) -> Samples:
        """Generate samples for a request (`n` and `settings` as in `request`): a routing strategy
        (full, topk, top1, sample, oracle), an ODE solver, conditions, guidance, given fields."""
        request = _as_request(n, settings)
        e = self._ensemble_on(check_device(request.device), request.model)
        generated = e.sample(request)
        return Samples(
            items=e.domain.decode(generated.batch),
            batch=generated.batch,
            strategy=request.strategy.value,
            expert_calls_per_sample=generated.expert_calls_per_sample,
            router_calls_per_sample=generated.router_calls_per_sample,
            assignment=generated.assignment,
            attribution=generated.attribution,
            trace=generated.trace,
            expert_ids=e.expert_ids or list(range(len(e.experts))),
        )

    def attribute(self, generated: Samples, nearest: int = 3) -> pd.DataFrame:
        """Which partitions made each sample: every expert's routing weight along the trajectory,
        and the `nearest` training records of the sample's main partition in the domain's feature
        space (see `archipelago.platform.modules.attribute`)."""
        return modules.attribute(self.run_dir, generated, nearest)

    def router_diagnostics(self, records: int = 2048, seed: int = 0, likelihood_draws: int | None = None
                           ) -> pd.DataFrame:
        """The router's accuracy, calibration (ECE), confidence and entropy at fixed t on the run's
        records (see `archipelago.router.diagnostics`), one row per t; with `likelihood_draws`, the
        experts' likelihood router's (`archipelago.router.likelihood`)."""
        return pd.DataFrame(steps.router_diagnostics(self.run_dir, records, seed, likelihood_draws))

    def coverage(self, generated: Samples) -> dict[str, Any]:
        """The share of samples nearest to each expert's cluster against the cluster's share of the
        data, and their total variation distance (see `archipelago.router.diagnostics.coverage`)."""
        return modules.coverage(self.run_dir, generated.items, self.version)

    def add_data(self, data: Any, new_partitions: int = 0, extra_steps: int | None = None, **launch: Any) -> Run:
        """Grow the run with new records (see `archipelago.platform.modules.add_data`); the grown run
        at its new ensemble version. `launch`: `runner.Launch` fields (default: in this process,
        untracked, as `fit`)."""
        modules.add_data(self.run_dir, data, new_partitions=new_partitions, extra_steps=extra_steps,
                         launch=_sdk_launch(launch))
        return Run(self.run_dir)

    def remove_expert(self, k: int, **launch: Any) -> Run:
        """Forget expert k and its partition (see `archipelago.platform.modules.remove_expert`)."""
        modules.remove_expert(self.run_dir, k, launch=_sdk_launch(launch))
        return Run(self.run_dir)

    def distill(self, ray: bool = False, wait: bool = False, **settings: Any) -> Run:
        """Distil the ensemble into a dense and a few-step student (`settings`: `distill.DistillConfig`
        fields); sample them with `model="student"` or `model="dense"`."""
        distill.distill(self.run_dir, distill.DistillConfig(**settings), ray=ray, wait=wait)
        return Run(self.run_dir, self.version)

    def records(self) -> pa.Table:
        """The records the run was fitted on."""
        return steps.read_records(self.run_dir)

    def evaluate(self, generated: Samples, real: Any = None, progress: bool = True, **options: Any) -> dict[str, Any]:
        """The domain's metrics of generated samples against `real` (a source the domain can read,
        scaled with this run's fitted state), or against the run's own records by default.
        `progress`: a progress bar on stderr where the domain draws one (time series: one step per
        metric and repeat); `options` go to the domain's `evaluate`."""
        table = self.records() if real is None else self.domain.ingest(real, fit=False)
        return self.domain.evaluate(table, generated.batch, progress=progress, **options)


def fit(data: Any, run_dir: str, domain: str | Domain = "timeseries", experts: int = 4, *,
        expert: dict[str, Any] | None = None, router: dict[str, Any] | None = None,
        ray: bool | str = False, tracking: bool | str = False, device: str | None = None, wait: bool = False,
        **settings: Any) -> Run:
    """Fit K experts and a router on `data` and return the run.

    `data` is anything the domain reads (for time series: a CSV/Parquet path, a DataFrame, an
    array, or "sines:N"); `domain` is a built-in name or a Domain instance; `expert` and `router`
    override their TrainConfig fields; other settings are RunConfig fields (seed, prediction,
    partition, placement, domain_config). `ray=False` trains in this process; `ray=True` on Ray
    (RAY_ADDRESS, else an embedded instance); `ray="host:port"` on that cluster. `tracking=True`
    logs to MLflow's default store, `tracking="<uri>"` to that server (why both default to off:
    `runner.Launch`). `device` is the torch device of every training (None: each TrainConfig's,
    by default CUDA when present); one that is not there is an error before anything is written.
    Re-running with the same arguments resumes where it stopped. While another writer holds the run
    directory, LeaseHeld names it; `wait=True` waits for it instead.
    """
    instance = domain if isinstance(domain, Domain) else None
    config = RunConfig(
        domain=domain_reference(instance) if instance else domain,
        domain_config=instance.to_config() if instance else settings.pop("domain_config", {}),
        data=data if isinstance(data, str) else None,
        experts=experts, expert=expert or {}, router=router or {}, **settings,
    )
    config = on_device(config, device)
    launch = Launch(ray=bool(ray), address=ray if isinstance(ray, str) else None, track=bool(tracking),
                    tracking_uri=tracking if isinstance(tracking, str) else None, wait=wait)
    result = runner.fit(config, str(run_dir), source=data, domain=instance, launch=launch)
    return Run(result.run_dir)


def _sdk_launch(settings: dict[str, Any]) -> Launch:
    """The SDK's launch: in this process and untracked unless asked (see `runner.Launch`)."""
    return Launch(**{"ray": False, "track": False} | settings)


def load(run_dir: str, version: int | None = None) -> Run:
    """Open a run directory written by `fit` (or by the command line, or by a cluster), at its
    newest ensemble version or at `version`."""
    return Run(run_dir, version)


def _as_request(n: int | SampleRequest | None, settings: dict[str, Any]) -> SampleRequest:
    if isinstance(n, SampleRequest):
        if settings:
            raise TypeError(f"give a SampleRequest or its fields, not both (got {sorted(settings)} too)")
        return n
    return SampleRequest(**settings) if n is None else SampleRequest(n=n, **settings)
