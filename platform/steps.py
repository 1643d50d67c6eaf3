"""The steps of one run, each reading its inputs from the run directory and writing its outputs there.

    run.json                        the resolved RunConfig (the run's identity)
    domain.json                     the domain's config with its fitted state (e.g. the scaler)
    records/part-<i>.parquet        the ingested records, in shards of `shard_rows`
    partition.json                  centroids, cluster sizes and shard sizes, feature standardization,
                                    per-cluster statistics, data fingerprint
    data/expert=<k>/part-<i>.parquet  the records of cluster k (hive-partitioned), in shards
    codec/, latents/expert=<k>/     domains with a codec: its checkpoints, and cluster k's latents
                                    (one shard per shard of data/expert=<k>/)
    latents.json                    marks the latents complete and names the codec checkpoint
    experts/expert-<k>/             expert k's checkpoints (safetensors + JSON, LATEST pointer)
    router/, routers/g<n>/          the router's checkpoints (g<n>: after the n-th add-data or remove-expert)
    ensemble.json, ensembles/v<N>.json  the assembled ensemble and every version of it: expert and
                                    router checkpoints, cluster sizes (`archipelago.platform.versions`)

The run directory is any storage URI (a local folder, s3://...). Because every step reads and
writes only there, a step can run on another machine or cluster, be repeated, or be resumed:
`prepare` refuses a directory that holds a different run (or the same run with fewer steps),
`partition` is skipped when done (and rebuilds a partition whose files were deleted), and training
resumes from the latest checkpoint. Writers hold leases (`archipelago.experts.lease`): the run's
own (`run_lease`, taken by a fit, `partition` and `assemble`) and each training's on its folder.

Experts and the codec read their data shard by shard (`StreamedSamples`), or with `stream: false`
all in memory in the same batches. The router reads all partitions in memory and draws every batch
from all of them (`Pooled`): its shards are partitions, and one-shard batches teach it nothing.
Ingesting and clustering also hold the records (an Arrow table) and their features in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from archipelago.domains import domain_class, domain_reference
from archipelago.experts import storage
from archipelago.experts.batch import Batch, concat
from archipelago.experts.checkpoint import DamagedCheckpoint, ema_weights, latest_checkpoint, load_checkpoint
from archipelago.experts.codec import encode_samples, latent_samples, latents_to_table, load_codec, train_codec
from archipelago.experts.data import Blocked, Pooled, Samples, StreamedSamples
from archipelago.experts.denoiser import Denoiser
from archipelago.experts.domain import Domain, Statistics
from archipelago.experts.lease import LEASE_FILE, Lease
from archipelago.experts.training import (
    ExpertConfig,
    OnLog,
    ProgressBar,
    TrainResult,
    data_parallel_ranks,
    derive_seed,
    pick_device,
    train_expert,
)
from archipelago.platform import manifest, versions
from archipelago.platform.config import TRAININGS, RunConfig, identity_diff, validate_domain
from archipelago.router.diagnostics import router_calibration
from archipelago.router.likelihood import LikelihoodRouter
from archipelago.router.partition import Partition, kmeans_partition
from archipelago.router.sampling import Generated, SampleRequest, sample_ensemble
from archipelago.router.training import Router, RouterConfig, train_router

RUN_FILE, DOMAIN_FILE, PARTITION_FILE = "run.json", "domain.json", "partition.json"
LATENTS_FILE = "latents.json"
ENSEMBLE_FILE = versions.ENSEMBLE_FILE


class RunConflict(ValueError):
    """The run directory already holds a different run."""


def expert_dir(run_dir: str, k: int) -> str:
    return storage.join(run_dir, "experts", f"expert-{k}")


def router_dir(run_dir: str, generation: int = 0) -> str:
    """The router of the partition's `generation` (0 as partitioned; each add-data or remove-expert
    makes the next, whose router trains anew on the experts then present)."""
    return storage.join(run_dir, *_router_parts(generation))


def _router_parts(generation: int) -> list[str]:
    return ["router"] if generation == 0 else ["routers", f"g{generation}"]


def codec_dir(run_dir: str) -> str:
    return storage.join(run_dir, "codec")


def write_table(uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def read_table(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def _write_shards(folder: str, table: pa.Table, shard_rows: int, first: int = 0) -> list[int]:
    """Write `table` as folder/part-<i>.parquet (i from `first`) of at most `shard_rows` rows each;
    their sizes."""
    sizes = []
    for i, start in enumerate(range(0, table.num_rows, shard_rows) or [0], first):  # an empty table: one empty shard
        shard = table.slice(start, shard_rows)
        write_table(_shard(folder, i), shard)
        sizes.append(shard.num_rows)
    return sizes


def _shard(folder: str, i: int) -> str:
    return storage.join(folder, f"part-{i}.parquet")


def _shard_names(folder: str) -> list[str]:
    """The part-<i>.parquet names in `folder`, in order of i."""
    names = [name for name in storage.list_dir(folder) if name.startswith("part-") and name.endswith(".parquet")]
    return sorted(names, key=lambda name: int(name[5:-8]))


def _read_shards(folder: str) -> pa.Table:
    names = _shard_names(folder)
    if not names:
        raise FileNotFoundError(f"no Parquet shards in {folder}")
    return pa.concat_tables([read_table(storage.join(folder, name)) for name in names])


def read_records(run_dir: str) -> pa.Table:
    """All ingested records of a run, in order."""
    return _read_shards(storage.join(run_dir, "records"))


def load_config(run_dir: str) -> RunConfig:
    uri = storage.join(run_dir, RUN_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {RUN_FILE})")
    return RunConfig(**storage.read_json(uri)["config"])


def load_domain(run_dir: str) -> Domain:
    saved = storage.read_json(storage.join(run_dir, DOMAIN_FILE))
    return domain_class(saved["domain"]).from_config(saved["config"])


def check_run_dir(config: RunConfig, run_dir: str) -> bool:
    """True when run_dir already holds this run; raise RunConflict when it holds another."""
    uri = storage.join(run_dir, RUN_FILE)
    if not storage.exists(uri):
        # A lease, or another writer's probe (an island checking the run directory at the same time), is no run.
        if [name for name in storage.list_dir(run_dir) if not name.startswith((LEASE_FILE, storage.PROBE_PREFIX))]:
            raise RunConflict(f"{run_dir} is not empty and holds no {RUN_FILE}: choose an empty or new directory")
        return False
    # Through RunConfig, so that a setting added since the run was made compares as its default.
    saved = RunConfig(**storage.read_json(uri)["config"]).model_dump(mode="json")
    differing = identity_diff(saved, config.model_dump(mode="json"))
    if differing:
        raise RunConflict(
            f"{run_dir} already holds a different run (differs in {', '.join(differing)}); choose another run directory"
        )
    _check_steps_not_lowered(saved, config, run_dir)
    return True


def _check_steps_not_lowered(saved: dict[str, Any], config: RunConfig, run_dir: str) -> None:
    """More steps train on from the last checkpoint; fewer would need weights the run no longer
    has (they were trained past), so lowering a training's steps is a RunConflict."""
    for name in TRAININGS:
        before, now = saved.get(name, {}).get("steps"), getattr(config, name).steps
        if before is not None and now < before:
            raise RunConflict(f"{name}.steps={now} is lower than the {before} steps {run_dir} was run with: "
                              f"steps can only be raised (training continues); start a new run directory for fewer")


def prepare(config: RunConfig, run_dir: str, source: Any = None, domain: Domain | None = None) -> Domain:
    """Ingest and partition in memory, then write run.json, domain.json, the records and the partitions.

    Nothing is written before the config, the domain, the data and the clustering have passed
    their checks; a run directory that already holds this run is left as it is.
    """
    domain = domain or validate_domain(config)
    exists = check_run_dir(config, run_dir)
    if exists:  # the same run: settings that may change on resume (steps, device, ...) take effect
        storage.write_json(storage.join(run_dir, RUN_FILE), {"config": config.model_dump(mode="json")})
        if storage.exists(storage.join(run_dir, PARTITION_FILE)):
            return load_domain(run_dir)
    source = source if source is not None else config.data
    if source is None:
        raise ValueError("no data: give a source (a path, 'sines:N', a DataFrame or an array)")
    records = domain.ingest(source)
    if config.experts > records.num_rows:
        raise ValueError(f"experts={config.experts} is larger than the {records.num_rows} records of the data")
    clusters = _cluster(config, domain, records)
    storage.write_json(storage.join(run_dir, RUN_FILE), {"config": config.model_dump(mode="json")})
    storage.write_json(
        storage.join(run_dir, DOMAIN_FILE), {"domain": domain_reference(domain), "config": domain.to_config()}
    )
    _write_shards(storage.join(run_dir, "records"), records, config.shard_rows)
    _write_partition(run_dir, config, domain, records, clusters)
    return domain


def _cluster(config: RunConfig, domain: Domain, records: pa.Table) -> Partition:
    p = config.partition
    return kmeans_partition(domain.features(records), config.experts, seed=config.seed, balanced=p.balanced,
                            slack=p.slack, min_size=p.min_size, method=p.method, fine_clusters=p.fine_clusters)


def _write_partition(run_dir: str, config: RunConfig, domain: Domain, records: pa.Table,
                     clusters: Partition) -> dict[str, Any]:
    """Write data/expert=<k>/ for every cluster, then partition.json (which marks the step done)."""
    shards, statistics = [], []
    for k in range(len(clusters.centroids)):
        cluster = records.filter(pa.array(clusters.labels == k))
        shards.append(_write_shards(storage.join(run_dir, "data", f"expert={k}"), cluster, config.shard_rows))
        statistics.append(domain.statistics(cluster))
    summary = {**clusters.to_dict(), "data_fingerprint": domain.samples(records).fingerprint(),
               "features": f"{domain.name}.features", "statistics": statistics, "shards": shards}
    storage.write_json(storage.join(run_dir, PARTITION_FILE), summary)
    return summary


def partition(run_dir: str) -> dict[str, Any]:
    """The partition summary; clusters the records (and writes them by expert) if not done yet.

    When done, a partition whose shards are missing is rebuilt from the records (the clustering is
    seeded, so it is the same) and listed under "rebuilt"; the other partitions are left as they are.
    """
    done = storage.join(run_dir, PARTITION_FILE)
    if storage.exists(done):
        summary = storage.read_json(done)
        shards = shards_of(summary)
        missing = [k for k in ids_of(summary) if not all(storage.exists(_shard(_data_dir(run_dir, k), i))
                                                         for i in range(len(shards[k])))]
        if missing and generation_of(summary):
            raise RunConflict(f"partitions {missing} of {run_dir} are missing and cannot be rebuilt: the run's "
                              f"partitions changed since clustering (add-data or remove-expert)")
        if missing:
            _rebuild_partitions(run_dir, summary, missing)
        return {**summary, "rebuilt": missing}
    config, domain = load_config(run_dir), load_domain(run_dir)
    records = read_records(run_dir)
    return _write_partition(run_dir, config, domain, records, _cluster(config, domain, records))


def _rebuild_partitions(run_dir: str, summary: dict[str, Any], missing: list[int]) -> None:
    """Write data/expert=<k>/ again for the partitions `missing`, after checking that clustering the
    records again gives the partition that partition.json describes."""
    config, domain = load_config(run_dir), load_domain(run_dir)
    records = read_records(run_dir)
    clusters = _cluster(config, domain, records)
    if clusters.sizes != summary["sizes"] or not np.allclose(clusters.centroids, summary["centroids"]):
        raise RunConflict(f"cannot rebuild partitions {missing} of {run_dir}: clustering its records gives sizes "
                          f"{clusters.sizes}, {PARTITION_FILE} says {summary['sizes']}; start a new run directory")
    for k in missing:
        _write_shards(_data_dir(run_dir, k), records.filter(pa.array(clusters.labels == k)), config.shard_rows)


def encode(run_dir: str, on_log: OnLog | None = None) -> dict[str, Any] | None:
    """Domains with a codec: train it on all records, then store every partition's latents once
    (latents/expert=<k>/), so that experts and the router read latents and never run the encoder.
    Done when latents.json exists; None for domains without a codec."""
    domain = load_domain(run_dir)
    if domain.codec_network() is None:
        return None
    done = storage.join(run_dir, LATENTS_FILE)
    if storage.exists(done):
        return storage.read_json(done)
    config = load_config(run_dir)
    train = config.codec.model_copy(update={"seed": derive_seed(config.seed, "codec")})
    summary = read_summary(run_dir)
    sizes = shards_of(summary)
    shards = [(k, i) for k in ids_of(summary) for i in range(len(sizes[k]))]
    records = _read_blocks(config, [_shard(_data_dir(run_dir, k), i) for k, i in shards], domain.samples,
                           [sizes[k][i] for k, i in shards])
    result = train_codec(train, domain, records, codec_dir(run_dir), on_log)
    codec = load_codec(domain, result.checkpoint, pick_device(train.device))
    for k, i in shards:  # one shard in memory at a time
        _write_latents(run_dir, codec, domain, k, i)
    summary = {"codec": ["codec", storage.base_name(result.checkpoint)]}
    storage.write_json(done, summary)
    return summary


def _write_latents(run_dir: str, codec: torch.nn.Module, domain: Domain, k: int, i: int) -> None:
    """Encode shard i of partition k into latents/expert=<k>/part-<i>.parquet."""
    latents = encode_samples(codec, domain.samples(read_table(_shard(_data_dir(run_dir, k), i))))
    write_table(_shard(_latents_dir(run_dir, k), i), latents_to_table(latents))


def _latents_dir(run_dir: str, k: int) -> str:
    return storage.join(run_dir, "latents", f"expert={k}")


def append_partition(run_dir: str, k: int, table: pa.Table, first: int) -> list[int]:
    """Add records to partition k as its shards from `first` on (and their latents when the run has
    a codec); the new shards' sizes. Nothing refers to them until partition.json lists them."""
    sizes = _write_shards(_data_dir(run_dir, k), table, load_config(run_dir).shard_rows, first)
    latents = storage.join(run_dir, LATENTS_FILE)
    if storage.exists(latents):
        domain = load_domain(run_dir)
        codec = load_codec(domain, storage.join(run_dir, *storage.read_json(latents)["codec"]), torch.device("cpu"))
        for i in range(first, first + len(sizes)):
            _write_latents(run_dir, codec, domain, k, i)
    return sizes


def append_records(run_dir: str, table: pa.Table) -> None:
    """Add records to the run's records/ as new shards."""
    folder = storage.join(run_dir, "records")
    _write_shards(folder, table, load_config(run_dir).shard_rows, len(_shard_names(folder)))


def drop_records(run_dir: str, rows: pa.Table) -> int:
    """Rewrite records/ without the records equal to a row of `rows`, one shard at a time; how many
    were dropped. (Records have no ids: a row is known by its contents.)"""
    gone, dropped, folder = set(row_keys(rows)), 0, storage.join(run_dir, "records")
    for name in _shard_names(folder):
        shard = read_table(storage.join(folder, name))
        keep = [key not in gone for key in row_keys(shard)]
        if not all(keep):
            write_table(storage.join(folder, name), shard.filter(pa.array(keep)))
            dropped += len(keep) - sum(keep)
    return dropped


def row_keys(table: pa.Table) -> list[str]:
    """One digest per row of its contents."""
    return [hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()
            for row in table.to_pylist()]


def delete_partition(run_dir: str, k: int) -> None:
    """Delete partition k's data, latents and expert checkpoints."""
    for folder in (_data_dir(run_dir, k), _latents_dir(run_dir, k), expert_dir(run_dir, k)):
        storage.delete_dir(folder)


def _data_dir(run_dir: str, k: int) -> str:
    return storage.join(run_dir, "data", f"expert={k}")


def read_summary(run_dir: str) -> dict[str, Any]:
    """partition.json: the partition summary that the readers below take apart (read it once)."""
    return storage.read_json(storage.join(run_dir, PARTITION_FILE))


def _shard_sizes(run_dir: str) -> list[list[int]]:
    return shards_of(read_summary(run_dir))


def shards_of(summary: dict[str, Any]) -> list[list[int]]:
    """The sizes of every partition's shards (one shard each in runs partitioned before shards were
    recorded)."""
    return summary.get("shards") or [[size] for size in summary["sizes"]]


def expert_records(run_dir: str, k: int) -> pa.Table:
    """The records of partition k only."""
    return _read_shards(_data_dir(run_dir, k))


def expert_samples(run_dir: str, k: int, domain: Domain) -> Samples:
    """What expert k trains on: its partition's records as tensors, or its stored latents when the
    run has a codec; read shard by shard unless the run says `stream: false`."""
    sizes = _shard_sizes(run_dir)[k]
    return _read_blocks(load_config(run_dir), _training_shards(run_dir, k, len(sizes)), _as_samples(run_dir, domain),
                        sizes)


def _training_shards(run_dir: str, k: int, count: int) -> list[str]:
    latents = storage.exists(storage.join(run_dir, LATENTS_FILE))
    folder = _latents_dir(run_dir, k) if latents else _data_dir(run_dir, k)
    return [_shard(folder, i) for i in range(count)]


def _read_blocks(config: RunConfig, uris: list[str], to_samples: Callable[[pa.Table], Samples],
                 sizes: list[int]) -> Samples:
    """The samples of shards `uris` (of `sizes` records): streamed, or all read now (`stream: false`)."""
    if config.stream:
        return StreamedSamples(sizes, lambda b: to_samples(read_table(uris[b])))
    return Blocked(to_samples(pa.concat_tables([read_table(uri) for uri in uris])), sizes)


def _as_samples(run_dir: str, domain: Domain) -> Callable[[pa.Table], Samples]:
    return latent_samples if storage.exists(storage.join(run_dir, LATENTS_FILE)) else domain.samples


def expert_ids(run_dir: str) -> list[int]:
    return ids_of(read_summary(run_dir))


def ids_of(summary: dict[str, Any]) -> list[int]:
    """The run's experts now: 0..K-1 as partitioned, then as add-data and remove-expert changed them."""
    return summary.get("experts", list(range(len(summary["sizes"]))))


def generation(run_dir: str) -> int:
    return generation_of(read_summary(run_dir))


def generation_of(summary: dict[str, Any]) -> int:
    """How many times add-data or remove-expert changed the partitions (0: as partitioned)."""
    return summary.get("generation", 0)


def steps_of(summary: dict[str, Any], config: RunConfig, k: int) -> int:
    """Expert k's training steps: the run's, or more for an expert whose partition grew."""
    return summary.get("expert_steps", {}).get(str(k), config.expert.steps)


def check_expert(run_dir: str, k: int, summary: dict[str, Any] | None = None) -> None:
    """Raise ValueError unless expert k is one of the run's experts."""
    ids = ids_of(summary or read_summary(run_dir))
    if k not in ids:
        raise ValueError(f"expert {k} does not exist: the run's experts are {ids}")


def run_lease(run_dir: str, purpose: str, wait: bool | float = False) -> Lease:
    """The lease of the whole run directory, held by whatever writes its run-level files (a fit,
    `partition`, `assemble`); see `archipelago.experts.lease`."""
    return Lease(run_dir, purpose, wait)


def train_expert_step(run_dir: str, k: int, on_log: OnLog | None = None, progress_bar: ProgressBar | None = None,
                      wait: bool | float = False, island: str | None = None) -> TrainResult:
    """Train (or resume) expert k on its own partition, holding the lease of its folder (`wait` as
    in `Lease`) and recording its state, on `island`, in the run's manifest. As one of several
    data-parallel ranks (`archipelago.platform.data_parallel`), only rank 0 takes the lease and
    writes the manifest; the other ranks read and compute."""
    config, domain, summary = load_config(run_dir), load_domain(run_dir), read_summary(run_dir)
    check_expert(run_dir, k, summary)
    train = config.expert.model_copy(update={"seed": derive_seed(config.seed, "expert", k),
                                             "steps": steps_of(summary, config, k)})
    expert = ExpertConfig(partition=k, prediction=config.prediction, train=train)
    writer = data_parallel_ranks().rank == 0
    with contextlib.ExitStack() as held:
        if writer:
            held.enter_context(Lease(expert_dir(run_dir, k), f"training expert {k}", wait))
            if (latest_step(expert_dir(run_dir, k)) or 0) < train.steps:  # a finished expert's record stays as is
                held.enter_context(manifest.training(run_dir, k, island))
        result = train_expert(expert, domain, expert_samples(run_dir, k, domain), expert_dir(run_dir, k), on_log,
                              summary["statistics"][k], progress_bar, new_data=k in summary.get("grown", []))
        if writer:
            manifest.finished(run_dir, k, result.checkpoint, result.steps)
        return result


def latest_step(folder: str) -> int | None:
    """The step of the latest complete checkpoint in `folder` (None without one)."""
    latest = latest_checkpoint(folder)
    return storage.read_json(storage.join(latest, "meta.json"))["step"] if latest else None


def train_router_step(run_dir: str, on_log: OnLog | None = None, progress_bar: ProgressBar | None = None,
                      wait: bool | float = False) -> TrainResult:
    """Train (or resume) the router on every partition's records with their cluster labels, holding
    the lease of its folder."""
    summary = read_summary(run_dir)
    folder = router_dir(run_dir, generation_of(summary))
    with Lease(folder, "training the router", wait):
        return _train_router(run_dir, summary, folder, on_log, progress_bar)


def _train_router(run_dir: str, summary: dict[str, Any], folder: str, on_log: OnLog | None,
                  progress_bar: ProgressBar | None) -> TrainResult:
    config, domain = load_config(run_dir), load_domain(run_dir)
    sizes, ids = shards_of(summary), ids_of(summary)
    labels = torch.cat([torch.full((sum(sizes[k]),), i) for i, k in enumerate(ids)])  # positions among `ids`
    train = config.router.model_copy(update={"seed": derive_seed(config.seed, "router")})
    return train_router(
        RouterConfig(num_experts=len(ids), train=train),
        domain,
        pooled_samples(run_dir, summary, domain),
        labels,
        folder,
        on_log,
        progress_bar,
    )


def pooled_samples(run_dir: str, summary: dict[str, Any], domain: Domain) -> Pooled:
    """Every partition's training samples (latents with a codec) in memory, in expert order, each
    batch drawn from all of them at once (the router's and the dense student's data)."""
    sizes, ids = shards_of(summary), ids_of(summary)
    uris = [uri for k in ids for uri in _training_shards(run_dir, k, len(sizes[k]))]
    blocks = [n for k in ids for n in sizes[k]]
    to_samples = _as_samples(run_dir, domain)
    return Pooled(Blocked(to_samples(pa.concat_tables([read_table(uri) for uri in uris])), blocks))


def assemble(run_dir: str) -> dict[str, Any]:
    """Record the ensemble of the experts' and the current router's newest checkpoints as a version
    (a new one only when it changed; see `archipelago.platform.versions`) and return it."""
    summary = read_summary(run_dir)
    ids, g = ids_of(summary), generation_of(summary)
    experts = {k: latest_checkpoint(expert_dir(run_dir, k)) for k in ids}
    missing = [k for k, uri in experts.items() if uri is None]
    if missing:
        raise FileNotFoundError(f"experts {missing} of {run_dir} have no checkpoint: train them first")
    verified = {k: _intact(uri, run_dir, k) for k, uri in experts.items()}
    router = latest_checkpoint(router_dir(run_dir, g))
    if router is not None:
        _intact(router, run_dir, None)
    latents = storage.join(run_dir, LATENTS_FILE)
    ensemble = {
        "expert_ids": ids,
        "experts": [["experts", f"expert-{k}", storage.base_name(experts[k])] for k in ids],
        "fingerprints": [verified[k].meta["data_fingerprint"] for k in ids],
        "cluster_sizes": [summary["sizes"][k] for k in ids],
        "statistics": [summary["statistics"][k] for k in ids],
        "codec": storage.read_json(latents)["codec"] if storage.exists(latents) else None,
        "router": [*_router_parts(g), storage.base_name(router)] if router else None,
        "generation": g,
    }
    return versions.record(run_dir, ensemble)


@dataclass(frozen=True)
class LoadedEnsemble:
    """A run's domain, experts (EMA weights), router, cluster sizes and per-expert statistics, ready
    to sample; `decode` maps generated latents back to records' fields when the run has a codec."""

    domain: Domain
    experts: list[Denoiser]
    router: Router | None
    cluster_sizes: list[int]
    statistics: list[Statistics]
    decode: Callable[[Batch], Batch] | None = None
    expert_ids: list[int] | None = None  # the run's expert id of each position (None: 0..K-1)
    version: int | None = None  # the ensemble version (None: assembled before versions were kept)
    coupled: bool = False  # its network reads discrete fields' reveal noise (a few-step student)

    def sample(self, request: SampleRequest) -> Generated:
        """Generate samples for a request (see `archipelago.router.sampling`)."""
        return sample_ensemble(self.domain, self.experts, self.router, request, self.cluster_sizes, self.statistics,
                               self.decode, coupled=self.coupled)


def load_ensemble(run_dir: str, device: str | torch.device = "cpu", version: int | None = None) -> LoadedEnsemble:
    """Rebuild an assembled ensemble from the run directory: its newest version, or `version`."""
    saved, domain, config = versions.load(run_dir, version), load_domain(run_dir), load_config(run_dir)
    ids = versions.expert_ids_of(saved)
    experts = []
    for k, parts in zip(ids, saved["experts"], strict=True):
        net = domain.denoiser_network()
        net.load_state_dict(_intact(storage.join(run_dir, *parts), run_dir, k, ema=True))
        experts.append(Denoiser(net, domain.fields, config.prediction).to(device).eval())
    router = None
    if saved["router"] is not None:
        router = _load_router(run_dir, domain, len(ids), storage.join(run_dir, *saved["router"])).to(device)
    decode = None
    if saved.get("codec"):
        decode = decoder(domain, load_codec(domain, storage.join(run_dir, *saved["codec"]), device))
    return LoadedEnsemble(domain=domain, experts=experts, router=router, cluster_sizes=saved["cluster_sizes"],
                          statistics=saved["statistics"], decode=decode, expert_ids=ids,
                          version=saved.get("version"))


def router_diagnostics(run_dir: str, records: int = 2048, seed: int = 0,
                       likelihood_draws: int | None = None) -> list[dict[str, float]]:
    """The current router's accuracy and calibration along t (`router.diagnostics.router_calibration`)
    on up to `records` of the run's records, drawn from every partition in proportion to its size;
    with `likelihood_draws`, those of the assembled experts' likelihood router instead."""
    domain, summary = load_domain(run_dir), read_summary(run_dir)
    ids, sizes = ids_of(summary), shards_of(summary)
    if likelihood_draws is not None:
        ensemble = load_ensemble(run_dir)
        router = LikelihoodRouter(ensemble.experts, domain.fields, ensemble.cluster_sizes, likelihood_draws,
                                  torch.Generator().manual_seed(seed))
    else:
        checkpoint = latest_checkpoint(router_dir(run_dir, generation_of(summary)))
        if checkpoint is None:
            raise FileNotFoundError(f"{run_dir} has no trained router yet")
        router = _load_router(run_dir, domain, len(ids), checkpoint)
    total, generator, parts, labels = sum(sum(sizes[k]) for k in ids), torch.Generator().manual_seed(seed), [], []
    for i, k in enumerate(ids):
        size = sum(sizes[k])
        take = torch.randperm(size, generator=generator)[: max(1, round(records * size / total))].sort().values
        parts.append(expert_samples(run_dir, k, domain).batch(take))
        labels.append(torch.full((len(take),), i))
    return router_calibration(router, domain.fields, concat(parts, domain.layout), torch.cat(labels), seed=seed)


def _load_router(run_dir: str, domain: Domain, num_experts: int, checkpoint: str) -> Router:
    """The router of a checkpoint, its EMA weights verified, in eval mode."""
    router = Router(domain.router_network(num_experts), domain.fields)
    router.load_state_dict(_intact(checkpoint, run_dir, None, ema=True))
    return router.eval()


def _intact(checkpoint: str, run_dir: str, k: int | None, ema: bool = False) -> Any:
    """Verify expert k's checkpoint (the router's when k is None; its EMA weights when `ema`); a
    damaged one is an error naming the file and what to run: training again resumes from the
    newest intact checkpoint and rewrites this one."""
    try:
        return ema_weights(checkpoint) if ema else load_checkpoint(checkpoint, with_state=False)
    except DamagedCheckpoint as error:
        what, again = ("the router", "train-router") if k is None else (f"expert {k}", f"train-expert --expert {k}")
        raise DamagedCheckpoint(f"{what}: {error}. Run `archipelago {again} --run-dir {run_dir}` (it resumes "
                                f"from the newest intact checkpoint), then `archipelago assemble`") from error


def decoder(domain: Domain, codec: torch.nn.Module) -> Callable[[Batch], Batch]:
    """Generated latents -> the records' fields, other tensors (conditions) kept."""
    def decode(latents: Batch) -> Batch:
        with torch.no_grad():
            return {**{k: v for k, v in latents.items() if k not in domain.fields}, **codec.decode(latents)}

    return decode
