"""The configuration of one run, validated at the edge and saved whole in the run directory.

A run config is a pydantic model with unknown keys refused, so a typo in a YAML file or a
command-line override is an error that names the key before any work starts. The domain's own
config is validated by the domain class itself (`validate_domain`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from archipelago.domains import domain_class
from archipelago.experts.conventions import Prediction
from archipelago.experts.domain import Domain
from archipelago.experts.training import RESUMABLE_KEYS, TrainConfig

# Keys that do not change what a run computes, so they may differ when a run is resumed. Where
# experts train (placement) is one of them: an expert may move to another island, or to more
# data-parallel workers (whose extra ranks draw noise streams of their own from there on).
NON_IDENTITY_KEYS = RESUMABLE_KEYS | {"device", "stream", "placement", "router_placement"}


class PartitionConfig(BaseModel):
    """How the data set is split into clusters (balanced k-means over the domain's features)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    balanced: bool = True  # cap cluster sizes at ceil(N / K * (1 + slack))
    slack: float = Field(0.05, ge=0)  # how far above N / K a balanced cluster may grow
    min_size: int = Field(2, ge=1)  # a smaller cluster is an error
    method: Literal["kmeans", "two_stage"] = "kmeans"  # two_stage: fine clusters merged into K (the paper's)
    fine_clusters: int = Field(0, ge=0)  # two_stage's fine clusters; 0: 32 K


class Placement(BaseModel):
    """Where and with what one expert trains."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    island: str | None = None  # Ray node label island=<name>; None: anywhere
    num_cpus: float = Field(1.0, ge=0)  # per worker
    num_gpus: float = Field(0.0, ge=0)  # per worker
    workers: int = Field(1, ge=1)  # data-parallel workers (Ray Train, DDP) of the expert on its island


class RunConfig(BaseModel):
    """Everything that defines a run: data, domain, K experts, their training and the router's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str = "timeseries"  # a built-in domain name or "module:Class"
    domain_config: dict[str, Any] = {}  # the domain's own settings (validated by the domain)
    data: str | None = None  # the source (a path, or "sines:N"); None when data is passed in memory
    experts: int = Field(4, ge=1)  # K, the number of partitions and experts
    shard_rows: int = Field(100_000, ge=1)  # records per Parquet shard (records, partitions, latents)
    stream: bool = True  # experts and the router read their data shard by shard; False: all in memory
    seed: int = 0  # the run seed; expert k and the router derive theirs from it
    prediction: Prediction = Prediction.VELOCITY  # what the experts predict
    partition: PartitionConfig = PartitionConfig()
    expert: TrainConfig = TrainConfig()  # training of each expert (its seed is derived per expert)
    router: TrainConfig = TrainConfig(steps=500)  # training of the router
    codec: TrainConfig = TrainConfig(steps=500)  # training of the domain's codec (only domains with one)
    placement: list[Placement] | None = None  # per expert; None: every expert anywhere
    router_placement: Placement = Placement()

    @field_validator("expert", "router", "codec", mode="before")
    @classmethod
    def _over_its_own_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        """A partial training mapping overrides that training's defaults (the router's 500 steps),
        not TrainConfig's: `--set router.lr=0.01` must not also change the router's steps."""
        if isinstance(value, Mapping):
            return cls.model_fields[info.field_name].default.model_dump() | dict(value)
        return value

    @model_validator(mode="after")
    def _placements_match_experts(self) -> RunConfig:
        if self.placement is not None and len(self.placement) != self.experts:
            raise ValueError(f"placement lists {len(self.placement)} experts, the run has experts={self.experts}")
        return self

    @model_validator(mode="after")
    def _workers_share_the_batch(self) -> RunConfig:
        """Data-parallel workers split the expert's global batch evenly, each on GPUs of its own; the
        router trains on one worker."""
        for k, place in enumerate(self.placement or []):
            if self.expert.batch_size % place.workers:
                raise ValueError(f"placement.{k}.workers={place.workers} does not divide "
                                 f"expert.batch_size={self.expert.batch_size}: each worker takes an equal share")
            if place.workers > 1 and 0 < place.num_gpus < 1:
                raise ValueError(f"placement.{k}.num_gpus={place.num_gpus}: data-parallel workers need a whole GPU "
                                 f"each (NCCL runs one rank per GPU)")
        if self.router_placement.workers != 1:
            raise ValueError("router_placement.workers: the router trains on one worker")
        return self

    def placement_of(self, k: int) -> Placement:
        """Expert k's placement; experts added after the fit (k >= experts) go anywhere."""
        return self.placement[k] if self.placement is not None and k < len(self.placement) else Placement()

    def islands(self) -> set[str]:
        named = [self.placement_of(k).island for k in range(self.experts)] + [self.router_placement.island]
        return {island for island in named if island is not None}


def validate_domain(config: RunConfig) -> Domain:
    """Build the run's domain from its config (errors name the domain and the bad key)."""
    cls = domain_class(config.domain)
    try:
        return cls.from_config(dict(config.domain_config))
    except ValueError as error:
        raise ValueError(f"invalid domain_config for domain {config.domain!r}: {error}") from error


def identity_diff(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring NON_IDENTITY_KEYS."""
    differing = []
    for key in sorted(set(saved) | set(new)):
        if key in NON_IDENTITY_KEYS:
            continue
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differing += identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            differing.append(f"{prefix}{key}")
    return differing


# The trainings of a run (expert, router, ...): the RunConfig fields that are a TrainConfig.
TRAININGS = tuple(name for name, field in RunConfig.model_fields.items() if field.annotation is TrainConfig)


def on_device(config: RunConfig, device: str | None) -> RunConfig:
    """The config with every training on `device` (None: the config as it is)."""
    if device is None:
        return config
    return RunConfig(**config.model_dump() | {name: {**getattr(config, name).model_dump(), "device": device}
                                               for name in TRAININGS})


def describe(error: ValidationError, key: Callable[[str], str] = str) -> str:
    """A pydantic error as one line that names each bad key (`key` renders a dotted location, e.g.
    as a flag) and the bad value when it is short: `expert.stepz: unknown key; experts: Input
    should be greater than or equal to 1 (got 0)`."""
    parts = []
    for item in error.errors():
        where = key(".".join(str(part) for part in item["loc"]) or "config")
        if item["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown key")
            continue
        value = item.get("input")
        shown = f" (got {value!r})" if isinstance(value, (str, int, float)) and len(repr(value)) <= 40 else ""
        parts.append(f"{where}: {item['msg']}{shown}")
    return "; ".join(parts)
