"""The steps of one run, each reading its inputs from the run directory and writing its outputs there.

    run.json                        the resolved RunConfig (the run's identity)
    domain.json                     the domain's config with its fitted state (e.g. the scaler)
    records/part-0.parquet          the ingested records
    partition.json                  centroids, cluster sizes, feature standardization, data fingerprint
    data/expert=<k>/part-0.parquet  the records of cluster k (hive-partitioned)
    codec/, latents/expert=<k>/     domains with a codec: its checkpoints, and cluster k's latents
    latents.json                    marks the latents complete and names the codec checkpoint
    experts/expert-<k>/             expert k's checkpoints (safetensors + JSON, LATEST pointer)
    router/                         the router's checkpoints
    ensemble.json                   the assembled ensemble: expert and router checkpoints, cluster sizes

The run directory is any storage URI (a local folder, s3://...). Because every step reads and
writes only there, a step can run on another machine or cluster, be repeated, or be resumed:
`prepare` refuses a directory that holds a different run, `partition` is skipped when done, and
training resumes from the latest checkpoint.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from archipelago.domains import domain_class, domain_reference
from archipelago.experts import storage
from archipelago.experts.batch import Batch
from archipelago.experts.checkpoint import ema_weights, latest_checkpoint
from archipelago.experts.codec import encode_samples, latent_samples, latents_to_table, load_codec, train_codec
from archipelago.experts.data import Samples
from archipelago.experts.denoiser import Denoiser
from archipelago.experts.domain import Domain, Statistics
from archipelago.experts.training import (
    ExpertConfig,
    OnLog,
    ProgressBar,
    TrainResult,
    derive_seed,
    pick_device,
    train_expert,
)
from archipelago.platform.config import RunConfig, identity_diff, validate_domain
from archipelago.router.partition import Partition, kmeans_partition
from archipelago.router.sampling import Generated, SampleRequest, sample_ensemble
from archipelago.router.training import Router, RouterConfig, train_router

RUN_FILE, DOMAIN_FILE, PARTITION_FILE, ENSEMBLE_FILE = "run.json", "domain.json", "partition.json", "ensemble.json"
LATENTS_FILE = "latents.json"


class RunConflict(ValueError):
    """The run directory already holds a different run."""


def expert_dir(run_dir: str, k: int) -> str:
    return storage.join(run_dir, "experts", f"expert-{k}")


def router_dir(run_dir: str) -> str:
    return storage.join(run_dir, "router")


def codec_dir(run_dir: str) -> str:
    return storage.join(run_dir, "codec")


def _write_table(uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def read_table(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


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
        if storage.list_dir(run_dir):
            raise RunConflict(f"{run_dir} is not empty and holds no {RUN_FILE}: choose an empty or new directory")
        return False
    differing = identity_diff(storage.read_json(uri)["config"], config.model_dump(mode="json"))
    if differing:
        raise RunConflict(
            f"{run_dir} already holds a different run (differs in {', '.join(differing)}); choose another run directory"
        )
    return True


def prepare(config: RunConfig, run_dir: str, source: Any = None, domain: Domain | None = None) -> Domain:
    """Ingest and partition in memory, then write run.json, domain.json, the records and the partitions.

    Nothing is written before the config, the domain, the data and the clustering have passed
    their checks; a run directory that already holds this run is left as it is.
    """
    domain = domain or validate_domain(config)
    exists = check_run_dir(config, run_dir)
    if exists and storage.exists(storage.join(run_dir, PARTITION_FILE)):
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
    _write_table(storage.join(run_dir, "records", "part-0.parquet"), records)
    _write_partition(run_dir, domain, records, clusters)
    return domain


def _cluster(config: RunConfig, domain: Domain, records: pa.Table) -> Partition:
    p = config.partition
    return kmeans_partition(domain.features(records), config.experts, seed=config.seed, balanced=p.balanced,
                            slack=p.slack, min_size=p.min_size)


def _write_partition(run_dir: str, domain: Domain, records: pa.Table, clusters: Partition) -> dict[str, Any]:
    """Write data/expert=<k>/ for every cluster, then partition.json (which marks the step done)."""
    for k in range(len(clusters.centroids)):
        _write_table(storage.join(run_dir, "data", f"expert={k}", "part-0.parquet"),
                     records.filter(pa.array(clusters.labels == k)))
    statistics = [domain.statistics(records.filter(pa.array(clusters.labels == k)))
                  for k in range(len(clusters.centroids))]
    summary = {**clusters.to_dict(), "data_fingerprint": domain.samples(records).fingerprint(),
               "features": f"{domain.name}.features", "statistics": statistics}
    storage.write_json(storage.join(run_dir, PARTITION_FILE), summary)
    return summary


def partition(run_dir: str) -> dict[str, Any]:
    """The partition summary; clusters the records (and writes them by expert) if not done yet."""
    done = storage.join(run_dir, PARTITION_FILE)
    if storage.exists(done):
        return storage.read_json(done)
    config, domain = load_config(run_dir), load_domain(run_dir)
    records = read_table(storage.join(run_dir, "records", "part-0.parquet"))
    return _write_partition(run_dir, domain, records, _cluster(config, domain, records))


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
    records = pa.concat_tables([expert_records(run_dir, k) for k in range(config.experts)])
    result = train_codec(train, domain, domain.samples(records), codec_dir(run_dir), on_log)
    codec = load_codec(domain, result.checkpoint, pick_device(train.device))
    for k in range(config.experts):
        latents = encode_samples(codec, domain.samples(expert_records(run_dir, k)))
        _write_table(storage.join(run_dir, "latents", f"expert={k}", "part-0.parquet"), latents_to_table(latents))
    summary = {"codec": ["codec", storage.base_name(result.checkpoint)]}
    storage.write_json(done, summary)
    return summary


def expert_records(run_dir: str, k: int) -> pa.Table:
    """The records of partition k only."""
    return read_table(storage.join(run_dir, "data", f"expert={k}", "part-0.parquet"))


def expert_samples(run_dir: str, k: int, domain: Domain) -> Samples:
    """What expert k trains on: its partition's records as tensors, or its stored latents when the
    run has a codec."""
    return _as_samples(run_dir, domain)(_training_table(run_dir, k))


def _training_table(run_dir: str, k: int) -> pa.Table:
    if storage.exists(storage.join(run_dir, LATENTS_FILE)):
        return read_table(storage.join(run_dir, "latents", f"expert={k}", "part-0.parquet"))
    return expert_records(run_dir, k)


def _as_samples(run_dir: str, domain: Domain) -> Callable[[pa.Table], Samples]:
    return latent_samples if storage.exists(storage.join(run_dir, LATENTS_FILE)) else domain.samples


def check_expert(config: RunConfig, k: int) -> None:
    """Raise ValueError unless expert k is one of the run's experts."""
    if not 0 <= k < config.experts:
        raise ValueError(f"expert {k} does not exist: the run has experts 0..{config.experts - 1}")


def train_expert_step(run_dir: str, k: int, on_log: OnLog | None = None,
                      progress_bar: ProgressBar | None = None) -> TrainResult:
    """Train (or resume) expert k on its own partition."""
    config, domain = load_config(run_dir), load_domain(run_dir)
    check_expert(config, k)
    train = config.expert.model_copy(update={"seed": derive_seed(config.seed, "expert", k)})
    expert = ExpertConfig(partition=k, prediction=config.prediction, train=train)
    statistics = storage.read_json(storage.join(run_dir, PARTITION_FILE))["statistics"][k]
    return train_expert(expert, domain, expert_samples(run_dir, k, domain), expert_dir(run_dir, k), on_log,
                        statistics, progress_bar)


def train_router_step(run_dir: str, on_log: OnLog | None = None,
                      progress_bar: ProgressBar | None = None) -> TrainResult:
    """Train (or resume) the router on every partition's records with their cluster labels."""
    config, domain = load_config(run_dir), load_domain(run_dir)
    tables = [_training_table(run_dir, k) for k in range(config.experts)]
    labels = torch.cat([torch.full((t.num_rows,), k) for k, t in enumerate(tables)])
    train = config.router.model_copy(update={"seed": derive_seed(config.seed, "router")})
    return train_router(
        RouterConfig(num_experts=config.experts, train=train),
        domain,
        _as_samples(run_dir, domain)(pa.concat_tables(tables)),
        labels,
        router_dir(run_dir),
        on_log,
        progress_bar,
    )


def assemble(run_dir: str) -> dict[str, Any]:
    """Write ensemble.json from the experts' and the router's final checkpoints."""
    config = load_config(run_dir)
    experts = [latest_checkpoint(expert_dir(run_dir, k)) for k in range(config.experts)]
    missing = [k for k, uri in enumerate(experts) if uri is None]
    if missing:
        raise FileNotFoundError(f"experts {missing} of {run_dir} have no checkpoint: train them first")
    router = latest_checkpoint(router_dir(run_dir))
    summary = storage.read_json(storage.join(run_dir, PARTITION_FILE))
    ensemble = {
        "experts": [["experts", f"expert-{k}", storage.base_name(uri)] for k, uri in enumerate(experts)],
        "cluster_sizes": summary["sizes"],
        "statistics": summary["statistics"],
        "codec": storage.read_json(latents)["codec"] if storage.exists(latents := storage.join(run_dir, LATENTS_FILE))
        else None,
        "router": ["router", storage.base_name(router)] if router else None,
    }
    storage.write_json(storage.join(run_dir, ENSEMBLE_FILE), ensemble)
    return ensemble


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

    def sample(self, request: SampleRequest) -> Generated:
        """Generate samples for a request (see `archipelago.router.sampling`)."""
        return sample_ensemble(self.domain, self.experts, self.router, request, self.cluster_sizes, self.statistics,
                               self.decode)


def load_ensemble(run_dir: str, device: str | torch.device = "cpu") -> LoadedEnsemble:
    """Rebuild the assembled ensemble from the run directory."""
    uri = storage.join(run_dir, ENSEMBLE_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{run_dir} has no {ENSEMBLE_FILE}: the run is not assembled yet")
    saved, domain, config = storage.read_json(uri), load_domain(run_dir), load_config(run_dir)
    experts = []
    for parts in saved["experts"]:
        net = domain.denoiser_network()
        net.load_state_dict(ema_weights(storage.join(run_dir, *parts)))
        experts.append(Denoiser(net, domain.fields, config.prediction).to(device).eval())
    router = None
    if saved["router"] is not None:
        router = Router(domain.router_network(config.experts), domain.fields)
        router.load_state_dict(ema_weights(storage.join(run_dir, *saved["router"])))
        router = router.to(device).eval()
    decode = None
    if saved.get("codec"):
        decode = _decoder(domain, load_codec(domain, storage.join(run_dir, *saved["codec"]), device))
    return LoadedEnsemble(domain=domain, experts=experts, router=router, cluster_sizes=saved["cluster_sizes"],
                          statistics=saved["statistics"], decode=decode)


def _decoder(domain: Domain, codec: torch.nn.Module) -> Callable[[Batch], Batch]:
    """Generated latents -> the records' fields, other tensors (conditions) kept."""
    def decode(latents: Batch) -> Batch:
        with torch.no_grad():
            return {**{k: v for k, v in latents.items() if k not in domain.fields}, **codec.decode(latents)}

    return decode
