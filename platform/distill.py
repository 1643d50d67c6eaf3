"""The distill step: a run's ensemble distilled into a dense student, then a few-step student by reflow.

The objectives are `archipelago.experts.distill`'s; this step puts them in the run directory,
each part resumable like every other step:

    students/v<N>/dense/step-*/         the dense student of ensemble version N (it matches the full
                                        mixture on the run's data)
    students/v<N>/pairs/part-*.parquet  (noise, ensemble sample) pairs, one shard per task, each written whole
                                        (discrete fields: the reveal noise of the coupled sampler)
    students/v<N>/reflow/step-*/        the few-step student (reflow on the pairs, from the dense student)
    students/v<N>/distill.json          the settings its parts were made with (another teacher, student
                                        or number of pairs there is refused, naming what differs)
    students/v<N>-seed-<S>/...          the same, of a distillation with seed S > 0
    students/students.json              the students sampled now, and their version; written last

A new ensemble version (add-data, remove-expert) distils afresh into its own folder.

The pairs need the whole ensemble but no data, so their shards run as Ray tasks on any island when
the launch uses Ray, in this process otherwise. A student samples through the same request as the
ensemble (`SampleRequest.model`): it is a one-expert ensemble with no router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from archipelago.experts import storage
from archipelago.experts.batch import Batch, concat, noise_key
from archipelago.experts.checkpoint import ema_weights, latest_checkpoint
from archipelago.experts.codec import load_codec
from archipelago.experts.data import BatchSamples
from archipelago.experts.denoiser import Denoiser
from archipelago.experts.distill import Teacher, check_student_fields, pairs_batch, train_student
from archipelago.experts.domain import Domain, Statistics, merge_statistics
from archipelago.experts.training import OnLog, TrainConfig, derive_seed
from archipelago.platform import steps, versions
from archipelago.platform.config import identity_diff
from archipelago.platform.runner import Launch, absolute_run_dir
from archipelago.router.ensemble import Ensemble, Strategy
from archipelago.router.sampling import SampleRequest, sample_ensemble

STUDENTS = "students"
STUDENTS_FILE = "students.json"
SETTINGS_FILE = "distill.json"  # in each students folder: the settings its parts were made with
# The teacher's request fields that do not change its pairs (n and seed are set per shard).
TEACHER_NON_IDENTITY = {"n", "seed", "batch_size", "device", "progress"}
MODELS = {"student": "reflow", "dense": "dense"}  # SampleRequest.model -> its student in students.json


class DistillConfig(BaseModel):
    """How to distil a run's ensemble (the `distill` settings of the SDK and the command line)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    student: dict[str, Any] = {}  # the student network's domain settings over the run's (its size)
    dense: TrainConfig = TrainConfig(steps=2000)  # the dense student's training
    reflow: TrainConfig = TrainConfig(steps=2000)  # the few-step student's training on the pairs
    pairs: int = Field(4096, ge=1)  # (noise, ensemble sample) pairs for reflow
    pairs_per_shard: int = Field(1024, ge=1)  # pairs per task and per Parquet shard
    teacher: dict[str, Any] = {"strategy": "full", "solver": "heun", "steps": 20}  # how the pairs are sampled
    seed: int = 0  # seeds the students and the pairs (a repeat of the distillation: another seed)


def stream_seed(run_seed: int, config: DistillConfig, *stream: Any) -> int:
    """The seed of one stream of a distillation (seed 0 keeps the streams of those made before seeds)."""
    return derive_seed(run_seed, *stream, *([config.seed] if config.seed else []))


def folder_name(version: int | None, seed: int = 0) -> str:
    """The folder of the students of ensemble version `version` (each version distils afresh) and of
    distillation seed `seed` (another seed is another distillation beside it)."""
    return f"v{version or 0}" + (f"-seed-{seed}" if seed else "")


def folder(run_dir: str, version: int | None, *parts: str, seed: int = 0) -> str:
    """A folder under the students of ensemble version `version` and seed `seed` (see `folder_name`)."""
    return storage.join(run_dir, STUDENTS, folder_name(version, seed), *parts)


def student_domain(domain: Domain, settings: dict[str, Any], statistics: Statistics | None = None) -> Domain:
    """The run's domain with the student's network settings over it; its fields must be the run's.
    Where the domain has discrete fields and its denoiser can read their reveal noise, the student's
    does (the few-step student's coupling; see `archipelago.experts.distill`)."""
    discrete = any(spec.path.stochastic_steps for spec in domain.fields.values())
    if discrete and "reveal_noise" in domain.to_config():
        settings = {"reveal_noise": True, **settings}
    student = type(domain).from_config({**domain.to_config(), **settings}) if settings else domain
    check_student_fields(domain, student, statistics)
    return student


@dataclass(frozen=True)
class Checked:
    """What `check` found: the ensemble version to distil, the student's domain, the pairs' request."""

    ensemble: dict[str, Any]  # the newest ensemble version's record (versions.load)
    student: Domain
    teacher: SampleRequest

    @property
    def version(self) -> int | None:
        return self.ensemble.get("version")

    @property
    def statistics(self) -> Statistics:
        """The merged per-cluster statistics of the ensemble's experts."""
        return merge_statistics(self.ensemble.get("statistics", []))


def check(run_dir: str, config: DistillConfig) -> Checked:
    """Everything a distillation needs, checked before any work: an assembled ensemble, a student
    with the run's fields, a valid teacher request, and the settings of the folder it resumes."""
    try:
        saved = versions.load(run_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"cannot distil {run_dir}: {error} (run `archipelago fit` or `archipelago assemble` "
                                f"first)") from error
    student = student_domain(steps.load_domain(run_dir), config.student, merge_statistics(saved.get("statistics", [])))
    checked = Checked(saved, student, SampleRequest(**{**config.teacher, "n": config.pairs_per_shard}))
    check_settings(run_dir, config, checked.version)
    return checked


def check_settings(run_dir: str, config: DistillConfig, version: int | None) -> None:
    """Resuming a distillation must not mix the parts of two: a students folder whose settings
    differ from `config` in anything but steps and logging (its teacher, student, pairs, learning
    rates) is a RunConflict naming what differs. Raising steps trains on, as in a fit."""
    uri = folder(run_dir, version, SETTINGS_FILE, seed=config.seed)
    if not storage.exists(uri):
        return
    differing = settings_diff(DistillConfig(**storage.read_json(uri)["config"]), config)
    if differing:
        raise steps.RunConflict(
            f"{folder(run_dir, version, seed=config.seed)} holds a distillation with other settings (differs in "
            f"{', '.join(differing)}): distil with another seed, or delete that folder to start it afresh")


def settings_diff(saved: DistillConfig, config: DistillConfig) -> list[str]:
    """Dotted names of the settings that change what a distillation makes. The teacher is compared
    as the request it makes (defaults filled in), and its solver steps count: other steps make other pairs."""
    def teacher(c: DistillConfig) -> dict[str, Any]:
        request = SampleRequest(**{**c.teacher, "n": 1}).model_dump(mode="json", exclude=TEACHER_NON_IDENTITY)
        return {"teacher." + name: value for name, value in request.items()}

    differing = identity_diff(saved.model_dump(mode="json", exclude={"teacher"}),
                              config.model_dump(mode="json", exclude={"teacher"}))
    old, new = teacher(saved), teacher(config)
    return differing + [name for name in sorted(old) if old[name] != new[name]]


def record_settings(run_dir: str, config: DistillConfig, version: int | None) -> None:
    """Check the folder's settings again under the lease, and write them before its first part.
    (A folder made before settings were recorded takes the settings it is resumed with.)"""
    check_settings(run_dir, config, version)
    uri = folder(run_dir, version, SETTINGS_FILE, seed=config.seed)
    if not storage.exists(uri):
        storage.write_json(uri, {"config": config.model_dump(mode="json")})


def _mixture(ensemble: steps.LoadedEnsemble) -> Teacher:
    """The teacher of the dense student: the full mixture, sum_k p(k | x_t, t) u^(k)(x_t). A fresh
    Ensemble per call, because an Ensemble keeps every call's routing for its trace and attribution."""
    domain = ensemble.domain

    def teacher(x_t: Batch, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return Ensemble(ensemble.experts, ensemble.router, domain.fields, Strategy.FULL, layout=domain.layout,
                        conditions=domain.conditions)(x_t, t)

    return teacher


def distill_tracked(run_dir: str, config: DistillConfig, launch: Launch) -> dict[str, Any]:
    """`distill` as the launch says; when it tracks, as an MLflow run of the launch's experiment
    (the students' losses, prefixed dense_ and reflow_), and the run's model logged again with its
    students: a new version of the registered model with `launch.register`."""
    if not launch.track:
        return distill(run_dir, config, ray=launch.ray, wait=launch.wait, address=launch.address)
    from archipelago.platform import tracking

    run_dir = absolute_run_dir(run_dir)
    checked = check(run_dir, config)
    uri = tracking.resolve_tracking_uri(launch.tracking_uri)
    tracking.check_tracking(uri)
    saved = steps.load_config(run_dir)
    parent = tracking.start_parent(uri, launch.experiment, {"domain": saved.domain, "experts": saved.experts,
                                                            "distill": config.model_dump(mode="json")},
                                   run_dir, run_name="distill")
    with tracking.finishing(uri, parent):
        with tracking.ChildRun(uri, parent, "students", {"students": True}) as child:
            summary = _distill(run_dir, config, checked, launch.ray, launch.wait, launch.address, child.log)
        summary["model_uri"] = tracking.log_ensemble_model(uri, parent, run_dir, launch.register)
    return summary


def distill(run_dir: str, config: DistillConfig, ray: bool = False, wait: bool | float = False,
            address: str | None = None, on_log: OnLog | None = None) -> dict[str, Any]:
    """Distil (or resume distilling) the run's newest ensemble: the dense student, the pairs (as Ray
    tasks with `ray`, on the cluster at `address`: default RAY_ADDRESS, else embedded; Ray starts
    only when pairs are missing), the reflow student, then students.json. Checked before any work."""
    run_dir = absolute_run_dir(run_dir)
    return _distill(run_dir, config, check(run_dir, config), ray, wait, address, on_log)


def _distill(run_dir: str, config: DistillConfig, checked: Checked, ray: bool, wait: bool | float,
             address: str | None, on_log: OnLog | None) -> dict[str, Any]:
    with steps.run_lease(run_dir, "archipelago distill", wait):
        record_settings(run_dir, config, checked.version)
        dense = _train_dense(run_dir, config, checked, _prefixed(on_log, "dense_"))
        missing = [i for i in range(len(shard_sizes(config)))
                   if not storage.exists(shard_uri(run_dir, i, checked.version, config.seed))]
        if ray and missing:
            from archipelago.platform import islands

            if address:
                islands.connect(address)
            islands.submit_tasks([islands.TaskSpec(make_pairs, (run_dir, i, config, checked.version),
                                                   name=f"pairs-{i}") for i in missing])
        for i in missing:
            make_pairs(run_dir, i, config, checked.version)  # kept as they are where the tasks wrote them
        reflow = _train_reflow(run_dir, config, checked, _prefixed(on_log, "reflow_"))
        return _record(run_dir, config, checked, dense, reflow)


def _prefixed(on_log: OnLog | None, prefix: str) -> OnLog | None:
    if on_log is None:
        return None
    return lambda step, metrics: on_log(step, {prefix + name: value for name, value in metrics.items()})


def _train_dense(run_dir: str, config: DistillConfig, checked: Checked, on_log: OnLog | None) -> str:
    ensemble, summary = steps.load_ensemble(run_dir, version=checked.version), steps.read_summary(run_dir)
    run = steps.load_config(run_dir)
    data = steps.pooled_samples(run_dir, summary, ensemble.domain)
    train = config.dense.model_copy(update={"seed": stream_seed(run.seed, config, "dense student")})
    where = folder(run_dir, checked.version, "dense", seed=config.seed)
    return train_student(ensemble.domain, checked.student, data, train, where, _mixture(ensemble), run.prediction,
                         teacher_version=checked.version, on_log=on_log, statistics=checked.statistics).checkpoint


def shard_uri(run_dir: str, shard: int, version: int | None, seed: int = 0) -> str:
    """A pairs shard of the ensemble version it was sampled from (a new version never reuses them)."""
    return folder(run_dir, version, "pairs", f"part-{shard:05d}.parquet", seed=seed)


def shard_sizes(config: DistillConfig) -> list[int]:
    full, rest = divmod(config.pairs, config.pairs_per_shard)
    return [config.pairs_per_shard] * full + ([rest] if rest else [])


def make_pairs(run_dir: str, shard: int, config: DistillConfig, version: int | None) -> str:
    """Shard `shard` of the pairs of ensemble `version`: noise and the ensemble's sample from it
    (kept when already written). A task of its own: it needs the run's storage, nothing else."""
    uri = shard_uri(run_dir, shard, version, config.seed)
    if storage.exists(uri):
        return uri
    e = steps.load_ensemble(run_dir, version=version)
    seed = stream_seed(steps.load_config(run_dir).seed, config, "pairs", shard)
    request = SampleRequest(**{**config.teacher, "n": shard_sizes(config)[shard], "seed": seed})
    generated = sample_ensemble(e.domain, e.experts, e.router, request, e.cluster_sizes, e.statistics, keep_noise=True)
    steps.write_table(uri, tensors_table(pairs_batch(generated.batch, generated.noise, e.domain.fields)))
    return uri


# Our own tensor table: codec.latents_to_table stores dense [N, ...] tensors only, and the pairs of
# variable-size domains hold ragged levels and index tensors beside them.
def tensors_table(batch: Batch) -> pa.Table:
    """A batch as a Parquet-ready table: one row per tensor (name, dtype, shape, raw little-endian bytes)."""
    names = sorted(batch)
    values = [batch[name].detach().cpu().contiguous() for name in names]
    return pa.table({"name": names, "dtype": [str(v.dtype).removeprefix("torch.") for v in values],
                     "shape": [list(v.shape) for v in values],
                     "data": pa.array([v.numpy().tobytes() for v in values], type=pa.large_binary())})


def table_tensors(table: pa.Table) -> Batch:
    """The inverse of `tensors_table`."""
    out = {}
    for name, dtype, shape, data in zip(*(table[c].to_pylist() for c in ("name", "dtype", "shape", "data")),
                                        strict=True):
        array = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
        out[name] = torch.from_numpy(array.copy())
    return out


def read_pairs(run_dir: str, config: DistillConfig, domain: Domain, version: int | None) -> BatchSamples:
    parts = []
    for i in range(len(shard_sizes(config))):
        uri = shard_uri(run_dir, i, version, config.seed)
        part = table_tensors(steps.read_table(uri))
        stale = [name for name, spec in domain.fields.items()
                 if spec.path.stochastic_steps and not part[noise_key(name)].is_floating_point()]
        if stale:
            raise ValueError(f"{uri} holds no reveal noise for {stale} (pairs made before the coupled discrete "
                             f"sampler): delete {folder(run_dir, version, 'pairs', seed=config.seed)} and distil again")
        parts.append(part)
    return BatchSamples(concat(parts, domain.layout), domain.layout)


def _train_reflow(run_dir: str, config: DistillConfig, checked: Checked, on_log: OnLog | None) -> str:
    domain, run = steps.load_domain(run_dir), steps.load_config(run_dir)
    dense = latest_checkpoint(folder(run_dir, checked.version, "dense", seed=config.seed))
    if dense is None:
        raise FileNotFoundError(f"{run_dir} has no dense student yet: the few-step student starts from it")
    train = config.reflow.model_copy(update={"seed": stream_seed(run.seed, config, "reflow student")})
    pairs = read_pairs(run_dir, config, domain, checked.version)
    where = folder(run_dir, checked.version, "reflow", seed=config.seed)
    return train_student(domain, checked.student, pairs, train, where, prediction=run.prediction,
                         init=ema_weights(dense), teacher_version=checked.version, on_log=on_log,
                         statistics=checked.statistics).checkpoint


def _record(run_dir: str, config: DistillConfig, checked: Checked, dense: str, reflow: str) -> dict[str, Any]:
    """Write students.json last: the students, their config and the ensemble version they distil."""
    saved, where = checked.ensemble, [STUDENTS, folder_name(checked.version, config.seed)]
    summary = {"ensemble_version": checked.version, "config": config.model_dump(mode="json"),
               "dense": [*where, "dense", storage.base_name(dense)],
               "reflow": [*where, "reflow", storage.base_name(reflow)],
               "codec": saved.get("codec"), "cluster_sizes": [int(sum(saved["cluster_sizes"]))],
               "statistics": [merge_statistics(saved["statistics"])]}
    storage.write_json(storage.join(run_dir, STUDENTS, STUDENTS_FILE), summary)
    return summary


def load_student(run_dir: str, model: str, device: str | torch.device = "cpu") -> steps.LoadedEnsemble:
    """A student of the run as a one-expert ensemble (no router): `model` as in SampleRequest
    (student: the few-step one, or dense)."""
    uri = storage.join(run_dir, STUDENTS, STUDENTS_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{run_dir} has no students yet: run `archipelago distill {run_dir}` first")
    saved = storage.read_json(uri)
    config = DistillConfig(**saved["config"])
    domain = steps.load_domain(run_dir)
    net = student_domain(domain, config.student, saved["statistics"][0]).denoiser_network()
    net.load_state_dict(ema_weights(storage.join(run_dir, *saved[MODELS[model]])))
    student = Denoiser(net, domain.fields, steps.load_config(run_dir).prediction).to(device).eval()
    decode = None
    if saved.get("codec"):  # the student diffuses the ensemble's latents; the run's codec decodes them
        decode = steps.decoder(domain, load_codec(domain, storage.join(run_dir, *saved["codec"]), device))
    return steps.LoadedEnsemble(domain=domain, experts=[student], router=None, cluster_sizes=saved["cluster_sizes"],
                                statistics=saved["statistics"], decode=decode, expert_ids=[0],
                                coupled=MODELS[model] == "reflow")
