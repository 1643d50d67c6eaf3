"""Experts as modules: grow a run with new data, forget a partition, attribute samples to partitions.

Every expert saw only its own partition, so an ensemble can change one module at a time:

- `add_data`: new records go to the existing clusters by the saved centroids (the experts that
  receive records continue from their checkpoints on their grown partitions, for extra steps in
  proportion to the records added), or become `new_partitions` new clusters with new experts
  trained from scratch. Experts that receive nothing are not touched, byte for byte.
- `remove_expert`: expert k, its partition's records (in data/, latents/ and records/), its
  checkpoints, and every router trained on its data are deleted, and the deletion is recorded in
  partition.json; the versions that held it are withdrawn.

Either way the partitions move to a new generation, whose router trains anew on the partitions
then present (`steps.router_dir`), and a new ensemble version is assembled (and logged and
registered in MLflow when the launch tracks). What forgetting guarantees: after `remove_expert`
no file of the run holds the partition's records or weights trained on them. What it does not:
the codec of a latent domain was trained on all records and is kept; copies outside the run
directory (MLflow models logged before, samples drawn before) are not touched.

- `attribute`: each sample's routing weights averaged along its trajectory (which partitions made
  it), and its nearest training records within its main partition, in the domain's feature space
  standardized as the partition was.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.neighbors import NearestNeighbors

from archipelago.experts import storage
from archipelago.experts.domain import Domain
from archipelago.platform import runner, steps, versions
from archipelago.platform.config import RunConfig
from archipelago.platform.status import run_status
from archipelago.router import diagnostics
from archipelago.router.partition import Partition, kmeans_partition

if TYPE_CHECKING:
    from archipelago.platform.sdk import Samples


IN_PROCESS = runner.Launch(ray=False, track=False)  # the SDK's default: in this process, untracked


class RunBusy(ValueError):
    """A training of the run is not finished, so its modules cannot change yet."""


def add_data(run_dir: str, source: Any, new_partitions: int = 0, extra_steps: int | None = None,
             launch: runner.Launch = IN_PROCESS) -> dict[str, Any]:
    """Grow the run with the records of `source` (see the module docstring); the new version."""
    if new_partitions < 0:
        raise ValueError(f"new_partitions must be >= 0, got {new_partitions}")
    if extra_steps is not None and extra_steps < 1:
        raise ValueError(f"extra steps must be >= 1, got {extra_steps}")
    config, domain = steps.load_config(run_dir), steps.load_domain(run_dir)
    runner.preflight(config, run_dir, launch, domain)
    with steps.run_lease(run_dir, "archipelago add-data", launch.wait):
        check_settled(run_dir)
        table = domain.ingest(source, fit=False)  # matched to the run's fitted state, by name
        if table.num_rows == 0:
            raise ValueError("the new data holds no records")
        summary = steps.read_summary(run_dir)
        grow = _new_partitions if new_partitions else _into_clusters
        changed = grow(run_dir, config, domain, summary, table, new_partitions, extra_steps)
        steps.append_records(run_dir, table)
        summary["added"] = [*summary.get("added", []), {"records": table.num_rows, "experts": changed, "at": _now()}]
        _next_generation(run_dir, summary)
        return _train_and_assemble(config, run_dir, launch)


def _into_clusters(run_dir: str, config: RunConfig, domain: Domain, summary: dict[str, Any], table: pa.Table, _: int,
                   extra_steps: int | None) -> list[int]:
    """Assign the records to the nearest saved centroid of a present expert and append them to its
    partition; the experts that received records (they continue training on their grown data)."""
    ids = steps.ids_of(summary)
    z = _standardized(domain.features(table), summary)
    centroids = np.asarray(summary["centroids"])[ids]
    labels = np.asarray(ids)[((z[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)]
    grown = []
    for k in ids:
        part = table.filter(pa.array(labels == k))
        if part.num_rows == 0:
            continue
        old = summary["sizes"][k]
        target = steps.steps_of(summary, config, k)
        extra = extra_steps or max(1, math.ceil(target * part.num_rows / old))  # the same steps per record
        _append(run_dir, domain, summary, k, part)
        summary.setdefault("expert_steps", {})[str(k)] = target + extra
        summary["grown"] = sorted({*summary.get("grown", []), k})
        grown.append(k)
    return grown


def _new_partitions(run_dir: str, config: RunConfig, domain: Domain, summary: dict[str, Any], table: pa.Table,
                    count: int,
                    extra_steps: int | None) -> list[int]:
    """Cluster the records into `count` new partitions with new experts; their ids."""
    if count > table.num_rows:
        raise ValueError(f"new_partitions={count} is more than the {table.num_rows} new records")
    features = domain.features(table)
    p = config.partition
    labels = kmeans_partition(features, count, seed=config.seed, balanced=p.balanced, slack=p.slack,
                              min_size=p.min_size).labels
    z = _standardized(features, summary)
    present, added = steps.ids_of(summary), []
    for c in range(count):
        k, part = len(summary["sizes"]), table.filter(pa.array(labels == c))
        summary["centroids"].append(z[labels == c].mean(axis=0).tolist())  # in the run's standardized space
        summary["sizes"].append(0)
        summary["shards"].append([])
        summary["statistics"].append({})
        _append(run_dir, domain, summary, k, part)
        summary["experts"] = [*present, *added, k]
        summary.setdefault("expert_steps", {})[str(k)] = extra_steps or config.expert.steps
        added.append(k)
    return added


def _append(run_dir: str, domain: Domain, summary: dict[str, Any], k: int, part: pa.Table) -> None:
    """Append records to partition k and update its sizes, shards and statistics in `summary`."""
    summary["shards"][k] = [*summary["shards"][k], *steps.append_partition(run_dir, k, part,
                                                                           len(summary["shards"][k]))]
    summary["sizes"][k] += part.num_rows
    summary["statistics"][k] = domain.statistics(steps.expert_records(run_dir, k))


def _standardized(features: np.ndarray, summary: dict[str, Any]) -> np.ndarray:
    """Features standardized as the partition's were; other data (another width) is an error."""
    _check_width(features, summary)
    return (features - np.asarray(summary["mean"])) / np.asarray(summary["scale"])


def _check_width(features: np.ndarray, summary: dict[str, Any]) -> None:
    width = len(summary["mean"])
    if features.ndim != 2 or features.shape[1] != width:
        raise ValueError(f"the records have features of shape {features.shape[1:]}, the run's partition has "
                         f"{width}: they are not data of this run's domain and settings")


def remove_expert(run_dir: str, k: int, launch: runner.Launch = IN_PROCESS
                  ) -> dict[str, Any]:
    """Forget expert k and its partition (see the module docstring); the new version."""
    config = steps.load_config(run_dir)
    ids = steps.expert_ids(run_dir)
    if k not in ids:
        raise ValueError(f"expert {k} does not exist: the run's experts are {ids}")
    if len(ids) == 1:
        raise ValueError(f"expert {k} is the run's last expert: an ensemble needs at least one")
    runner.preflight(config, run_dir, launch)
    with steps.run_lease(run_dir, "archipelago remove-expert", launch.wait):
        check_settled(run_dir)
        summary = steps.read_summary(run_dir)
        rows = steps.expert_records(run_dir, k)
        dropped = steps.drop_records(run_dir, rows)
        for folder in _routers_trained_with(run_dir, k):
            storage.delete_dir(folder)
        steps.delete_partition(run_dir, k)
        withdrawn = versions.withdraw(run_dir, k, f"expert {k} and its partition were removed")
        summary["experts"] = [i for i in ids if i != k]
        summary["removed"] = [*summary.get("removed", []), {
            "expert": k, "records": rows.num_rows, "records_dropped": dropped, "versions_withdrawn": withdrawn,
            "at": _now()}]
        summary["sizes"][k], summary["shards"][k], summary["statistics"][k] = 0, [], {}
        summary["grown"] = [i for i in summary.get("grown", []) if i != k]
        _next_generation(run_dir, summary)
        return _train_and_assemble(config, run_dir, launch)


def _routers_trained_with(run_dir: str, k: int) -> list[str]:
    """The router folders whose training data held partition k: those of every version with expert
    k, and the current generation's."""
    folders = {steps.router_dir(run_dir, steps.generation(run_dir))}
    for saved in versions.history(run_dir):
        if k in versions.expert_ids_of(saved) and saved.get("router"):
            folders.add(storage.join(run_dir, *saved["router"][:-1]))
    return sorted(folders)


def check_settled(run_dir: str) -> None:
    """Raise RunBusy unless every expert reached its steps and no training holds a lease."""
    for expert in run_status(run_dir)["experts"]:
        if expert["writer"] is not None:
            raise RunBusy(f"expert {expert['expert']} is being trained by {expert['writer']}: wait until it is done")
        if expert["state"] != "done":
            raise RunBusy(f"expert {expert['expert']} is still training (step {expert['step'] or 0} of "
                          f"{expert['steps']}): finish the fit first")


def _next_generation(run_dir: str, summary: dict[str, Any]) -> None:
    summary["generation"] = summary.get("generation", 0) + 1
    storage.write_json(storage.join(run_dir, steps.PARTITION_FILE), summary)


def _train_and_assemble(config: RunConfig, run_dir: str, launch: runner.Launch) -> dict[str, Any]:
    runner.train_and_assemble(config, run_dir, launch)
    return versions.load(run_dir)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def coverage(run_dir: str, items: Any, version: int | None = None) -> dict[str, Any]:
    """Cluster coverage of generated items (the domain's objects) over the experts of an ensemble
    version (`archipelago.router.diagnostics.coverage`), with the experts' ids."""
    domain, saved = steps.load_domain(run_dir), versions.load(run_dir, version)
    summary = steps.read_summary(run_dir)
    ids = versions.expert_ids_of(saved)
    clusters = Partition(np.zeros(0, int), np.asarray(summary["centroids"])[ids], np.asarray(summary["mean"]),
                         np.asarray(summary["scale"]))
    features = domain.features(domain.ingest(items, fit=False))
    _check_width(features, summary)
    return {"experts": ids, **diagnostics.coverage(features, clusters, saved["cluster_sizes"])}


def attribute(run_dir: str, generated: Samples, nearest: int = 3) -> pd.DataFrame:
    """One row per sample: its main expert and that expert's weight, every expert's weight
    (`w_<id>`), and (with `nearest` > 0) the row numbers and feature distances of its nearest
    records in the main expert's partition (rows as in `steps.expert_records`)."""
    if generated.attribution is None:
        raise ValueError("these samples carry no attribution: attribute samples drawn with `Run.sample`")
    weights, ids = generated.attribution.numpy(), generated.expert_ids
    main = np.asarray(ids)[weights.argmax(axis=1)]
    frame = pd.DataFrame({"sample": range(len(weights)), "expert": main, "weight": weights.max(axis=1),
                          **{f"w_{k}": weights[:, i] for i, k in enumerate(ids)}})
    if nearest < 1:
        return frame
    domain = steps.load_domain(run_dir)
    summary = steps.read_summary(run_dir)
    z = _standardized(domain.features(domain.ingest(generated.items, fit=False)), summary)
    rows, distances = [None] * len(z), [None] * len(z)
    for k in np.unique(main):
        mine = np.flatnonzero(main == k)
        records = _standardized(domain.features(steps.expert_records(run_dir, int(k))), summary)
        index = NearestNeighbors(n_neighbors=min(nearest, len(records))).fit(records)
        found_distances, found = index.kneighbors(z[mine])
        for i, d, r in zip(mine, found_distances, found, strict=True):
            rows[i], distances[i] = r.tolist(), d.round(6).tolist()
    return frame.assign(nearest_rows=rows, nearest_distances=distances)
