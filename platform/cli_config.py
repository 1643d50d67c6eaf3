"""The command line's run settings: a YAML file, `--set` overrides and flags, resolved into one
validated RunConfig, a run directory and a Launch; plus the plan that `--dry-run` prints.

A config file holds the RunConfig fields (the run's identity, saved in run.json), the run
directory, and optionally the Launch fields (where the work runs and is tracked, free to change
between resumptions):

    run_dir: runs/sines                 # any storage URI; required here or as --run-dir
    data: sines:2000                    # a path (relative to the working directory) or sines:N
    domain: timeseries
    domain_config: {window: 24}
    experts: 4
    seed: 0
    expert: {steps: 2000, batch_size: 64}
    router: {steps: 500}
    placement: [{island: a}, {island: a}, {island: b}, {island: b}]   # optional, one per expert
    router_placement: {num_cpus: 1}
    address: 10.0.0.1:6379              # Launch fields, all optional: Ray GCS address,
    tracking_uri: http://mlflow:5000    #   MLflow tracking URI,
    experiment: archipelago             #   MLflow experiment,
    register: sines                     #   registered model name,
    island_wait_s: 60                   #   how long to wait for a node on each island,
    ray: true                           #   false: every step in this process,
    track: true                         #   false: no MLflow
    max_retries: 3

Precedence: the file, then each `--set dotted.key=value` in order (values read as YAML scalars or
flow collections: `--set expert.steps=200`, `--set 'placement=[{island: a}]'`), then the named
flags (`--run-dir`, `--experts`, ...). Every mistake raises ConfigError with one line naming the
file and the key.

The rest are the files and texts of the other commands: the plan of a fit, the Ray job of
`submit`, sample files, score tables and a run's status read from storage.

Sample files: .npy holds the decoded samples in the user's units ([n, L, C] windows for time
series); .csv and .parquet hold a long table (columns sample, step, then the channels) for domains
that decode to DataFrames. `evaluate` reads a .npy back through the run's own domain
(`ingest(fit=False)`: the run's fitted scaler), so metrics are computed in the scaled space the
experts learned, exactly as `Run.evaluate` does for samples in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydantic
import torch
import yaml

from archipelago.experts import storage
from archipelago.experts.checkpoint import latest_checkpoint
from archipelago.experts.domain import Domain
from archipelago.platform import jobs, steps, tracking
from archipelago.platform.config import RunConfig, validate_domain
from archipelago.platform.runner import Launch
from archipelago.platform.sdk import Samples

RUN_DIR = "run_dir"
LAUNCH_KEYS = tuple(f.name for f in dataclasses.fields(Launch))


class ConfigError(ValueError):
    """The config file, an override or a flag is wrong; nothing has run."""


@dataclass(frozen=True)
class Settings:
    """Everything a command line resolves to."""

    config: RunConfig
    run_dir: str
    launch: Launch
    domain: Domain  # validated from config.domain_config (its fitted state is not there yet)

    def as_dict(self) -> dict[str, Any]:
        """The resolved settings as a config file would hold them (defaults written out)."""
        return {RUN_DIR: self.run_dir, **self.config.model_dump(mode="json"), **dataclasses.asdict(self.launch)}


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, bad YAML or a non-mapping is a ConfigError."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read the config file {path}: {error.strerror or error}") from error
    return parse_mapping(text, path)


def parse_mapping(text: str, source: str) -> dict[str, Any]:
    """The mapping in YAML (or JSON) text; errors name `source`."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML: {_one_line(str(error))}") from error
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config file holds a mapping of keys to values, not a {type(raw).__name__}")
    return raw


def apply_set(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place (numbers in the key index into lists)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value, e.g. expert.steps=200")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {assignment!r}: invalid value: {_one_line(str(error))}") from error
    *parents, last = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parents):
        child = _child(node, part)
        if child is None:
            child = {}
            _assign(node, part, child, key)
        elif not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {key}: {'.'.join(parents[: depth + 1])} is a value, not a section")
        node = child
    _assign(node, last, value, key)


def _unshared(value: Any) -> Any:
    """A copy in which no two keys share a dict or list (YAML aliases do), so that `--set` on one
    key changes only that key."""
    if isinstance(value, dict):
        return {key: _unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshared(item) for item in value]
    return value


def _child(node: Any, part: str) -> Any:
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    return node.get(part)


def _assign(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, dict):
        node[part] = value
    elif part.isdigit() and int(part) < len(node):
        node[int(part)] = value
    else:
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)} items")


def resolve(
    path: str | None, overrides: Mapping[str, Any], sets: Sequence[str] = (), inline: str | None = None
) -> Settings:
    """Settings from a config file (or `inline` JSON/YAML text), `--set` overrides, then flags."""
    source = path or ("--config-json" if inline is not None else "command line")
    if inline is not None:
        raw = parse_mapping(inline, source)
    elif path:
        raw = read_config_file(path)
    else:
        raw = {}
    raw = _unshared(raw)
    for assignment in sets:
        apply_set(raw, assignment)
    raw.update({key: value for key, value in overrides.items() if value is not None})
    run_dir = raw.pop(RUN_DIR, None)
    if not run_dir:
        raise ConfigError(f"{source}: no run_dir: set run_dir in the config file or pass --run-dir")
    launch_raw = {key: raw.pop(key) for key in LAUNCH_KEYS if key in raw}
    try:
        config = RunConfig(**raw)
        launch = pydantic.TypeAdapter(Launch).validate_python(launch_raw)
    except pydantic.ValidationError as error:
        raise ConfigError(f"{source}: {describe(error)}") from error
    if config.data is None:
        raise ConfigError(f"{source}: no data: set data in the config file or pass --data (a path or sines:N)")
    try:
        domain = validate_domain(config)
    except ValueError as error:
        raise ConfigError(f"{source}: {_one_line(str(error))}") from error
    return Settings(config=config, run_dir=str(run_dir), launch=launch, domain=domain)


def settings_flags(p: argparse.ArgumentParser, ray: bool = True, launch: bool = True) -> None:
    """The flags that override the settings file: the run's own, then (`ray`) where it runs and
    (`launch`) how it is tracked."""
    p.add_argument("config", nargs="?", help="YAML settings file: RunConfig fields, run_dir, Launch fields")
    p.add_argument("--config-json", metavar="JSON", help="the settings inline as JSON (what submit passes on)")
    p.add_argument("--run-dir", help="run directory: a local path or a storage URI (s3://...)")
    p.add_argument("--data", help="data source: a .csv/.parquet path or sines:N")
    p.add_argument("--experts", type=int, help="K, the number of partitions and experts")
    p.add_argument("--seed", type=int, help="the run seed")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a settings key, e.g. --set expert.steps=200 (repeatable)",
    )
    if ray:
        p.add_argument("--address", help="Ray GCS address host:port (default: RAY_ADDRESS, else Ray embedded)")
        p.add_argument("--in-process", action="store_true", help="run every step in this process, without Ray")
    if launch:
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
        p.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
        p.add_argument("--experiment", help="MLflow experiment (default: archipelago)")
        p.add_argument("--register", metavar="NAME", help="register the ensemble model under NAME")
        p.add_argument(
            "--island-wait", dest="island_wait_s", type=float, metavar="S", help="seconds to wait for a node per island"
        )


# The settings keys that `settings_flags` override (flags named after them).
FLAG_KEYS = ("run_dir", "data", "experts", "seed", "address", "tracking_uri", "experiment", "register", "island_wait_s")


def settings_from_args(args: argparse.Namespace, absolute: bool = False) -> Settings:
    """Resolve the settings of a command parsed with `settings_flags`. With `absolute`, a local run
    directory is made absolute, so that Ray workers in other working directories share it."""
    if args.config and args.config_json:
        raise ConfigError("give either a settings file or --config-json, not both")
    overrides = {key: getattr(args, key, None) for key in FLAG_KEYS}
    overrides["ray"] = False if getattr(args, "in_process", False) else None
    overrides["track"] = False if getattr(args, "no_tracking", False) else None
    s = resolve(args.config, overrides, args.set, inline=args.config_json)
    if absolute and "://" not in s.run_dir:
        return dataclasses.replace(s, run_dir=os.path.abspath(s.run_dir))
    return s


def describe(error: pydantic.ValidationError) -> str:
    """A pydantic error as one line: `expert.stepz: unknown key; experts: must be >= 1`."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "config"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def to_yaml(settings: Settings) -> str:
    return yaml.safe_dump(settings.as_dict(), sort_keys=False)


def to_json(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


def _place(config: RunConfig, k: int | None) -> str:
    p = config.router_placement if k is None else config.placement_of(k)
    where = f"island {p.island}" if p.island else "anywhere"
    return f"{where}, {p.num_cpus:g} CPU, {p.num_gpus:g} GPU"


def ray_description(launch: Launch, env_address: str | None) -> str:
    if not launch.ray:
        return "none: every step in this process"
    if launch.address or env_address:
        return f"the cluster at {launch.address or env_address}"
    return "embedded: started inside this process"


def fit_plan(settings: Settings, tracking_uri: str | None, ray: str) -> str:
    """The steps of a fit, with where each runs, as text."""
    c, launch = settings.config, settings.launch
    tracking = f"{tracking_uri} (experiment {launch.experiment!r})" if tracking_uri else "off"
    model = f", registered as {launch.register!r}" if launch.register else ""
    lines = [
        f"run directory: {settings.run_dir}",
        f"ray: {ray}",
        f"tracking: {tracking}",
        "steps:",
        f"  1. check everything, ingest {c.data} ({c.domain}), {'balanced ' if c.partition.balanced else ''}"
        f"k-means into {c.experts} clusters; then write run.json, domain.json, records/, data/expert=<k>/",
        "  2. train, in parallel:",
        *(
            f"     expert {k}: {c.expert.steps} steps of batch {c.expert.batch_size}, {_place(c, k)}"
            for k in range(c.experts)
        ),
        f"     router: {c.router.steps} steps of batch {c.router.batch_size}, {_place(c, None)}",
        f"  3. assemble: ensemble.json{', logged as an MLflow model' + model if tracking_uri else ''}",
    ]
    return "\n".join(lines)


# --- submit: the Ray job of a fit -----------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    entrypoint: list[str]
    env_vars: dict[str, str]
    submission_id: str


def job_for(settings: Settings, environ: Mapping[str, str]) -> Job:
    """The job that runs `archipelago fit` on the cluster with these settings.

    The settings travel inline as JSON, so nothing is written into the working directory; the
    address is left out (the job joins the cluster it runs on, through the RAY_ADDRESS that Ray
    sets for it) and so is the tracking URI, which travels as MLFLOW_TRACKING_URI in the runtime
    environment with RAY_AUTH_MODE. The submission id hashes the entrypoint and the tracking URI.
    """
    values = {key: value for key, value in settings.as_dict().items() if key not in ("address", "tracking_uri")}
    uri = settings.launch.tracking_uri or environ.get(tracking.TRACKING_ENV)
    env = {"RAY_AUTH_MODE": environ.get("RAY_AUTH_MODE", "token")}
    if settings.launch.track and uri:
        env[tracking.TRACKING_ENV] = tracking.resolve_tracking_uri(uri)
    entrypoint = ["archipelago", "fit", "--config-json", to_json(values)]
    submission_id = jobs.submission_id_for({"entrypoint": entrypoint, "tracking_uri": env.get(tracking.TRACKING_ENV)})
    return Job(entrypoint=entrypoint, env_vars=env, submission_id=submission_id)


# --- sample files and scores ----------------------------------------------------------------------


def _write_npy(path: str, samples: Samples, domain: Domain) -> None:
    np.save(path, np.asarray(samples.items))


def _frame(samples: Samples, domain: Domain) -> pd.DataFrame:
    decode_frames = getattr(domain, "decode_frames", None)
    if decode_frames is None:
        raise ConfigError(f"the {domain.name} domain does not decode to tables: write a .npy file")
    frames = decode_frames(samples.batch)
    return pd.concat([f.assign(sample=i, step=range(len(f))) for i, f in enumerate(frames)], ignore_index=True)[
        ["sample", "step", *frames[0].columns]
    ]


WRITERS: dict[str, Callable[[str, Samples, Domain], None]] = {
    ".npy": _write_npy,
    ".csv": lambda path, samples, domain: _frame(samples, domain).to_csv(path, index=False),
    ".parquet": lambda path, samples, domain: _frame(samples, domain).to_parquet(path, index=False),
}


def sample_writer(path: str) -> Callable[[str, Samples, Domain], None]:
    suffix = Path(path).suffix.lower()
    if suffix not in WRITERS:
        raise ConfigError(f"--out {path}: unknown file type {suffix!r}; choose one of {sorted(WRITERS)}")
    return WRITERS[suffix]


def read_samples(path: str, domain: Domain) -> Samples:
    """Samples from a .npy file in user units, back in the domain's tensors (see the module docstring)."""
    if Path(path).suffix.lower() != ".npy":
        raise ConfigError(f"--samples {path}: expected a .npy file written by `archipelago sample`")
    items = np.load(path)
    table = domain.ingest(items, fit=False)
    batch = domain.samples(table).batch(torch.arange(table.num_rows))
    return Samples(
        items=items,
        batch=batch,
        strategy="file",
        expert_calls_per_sample=float("nan"),
        router_calls_per_sample=float("nan"),
    )


def score_table(scores: Mapping[str, Any], as_json: bool = False) -> str:
    """Metric, mean and 95% half-interval per row (scores with `mean` and `interval`, or plain numbers)."""
    rows = {name: (getattr(s, "mean", s), getattr(s, "interval", 0.0)) for name, s in scores.items()}
    if as_json:
        return json.dumps({name: {"mean": m, "interval": i} for name, (m, i) in rows.items()}, indent=2)
    width = max(len("metric"), *map(len, rows))
    lines = [f"{'metric':<{width}}  {'mean':>10}  {'± 95%':>10}"]
    lines += [f"{name:<{width}}  {m:>10.4f}  {i:>10.4f}" for name, (m, i) in rows.items()]
    return "\n".join(lines)


# --- status: progress read from storage -----------------------------------------------------------


def _progress(folder: str, configured: int) -> dict[str, Any]:
    latest = latest_checkpoint(folder)
    step = storage.read_json(storage.join(latest, "meta.json"))["step"] if latest else None
    state = "not started" if step is None else "done" if step >= configured else "in progress"
    return {"step": step, "steps": configured, "state": state}


def run_status(run_dir: str) -> dict[str, Any]:
    """What storage says about a run: partition sizes, each training's latest step, assembled or not.

    Only complete checkpoints count (LATEST moves after their files), so this is safe while a fit
    writes the run directory from anywhere.
    """
    config = steps.load_config(run_dir)
    partition = storage.join(run_dir, steps.PARTITION_FILE)
    return {
        "run_dir": run_dir,
        "domain": config.domain,
        "partition_sizes": storage.read_json(partition)["sizes"] if storage.exists(partition) else None,
        "experts": [
            {
                "expert": k,
                "island": config.placement_of(k).island,
                **_progress(steps.expert_dir(run_dir, k), config.expert.steps),
            }
            for k in range(config.experts)
        ],
        "router": _progress(steps.router_dir(run_dir), config.router.steps),
        "assembled": storage.exists(storage.join(run_dir, steps.ENSEMBLE_FILE)),
    }


def status_text(status: dict[str, Any], as_json: bool = False) -> str:
    if as_json:
        return json.dumps(status, indent=2)
    sizes = status["partition_sizes"]

    def row(name: str, p: dict[str, Any], size: Any = "") -> str:
        return f"{name:<10} {p['step'] if p['step'] is not None else '-':>6} / {p['steps']:<6} {p['state']:<12} {size}"

    lines = [f"run {status['run_dir']} ({status['domain']})", f"{'':<10} {'step':>6} / {'steps':<6} {'state':<12} size"]
    lines += [row(f"expert {e['expert']}", e, sizes[e["expert"]] if sizes else "-") for e in status["experts"]]
    lines += [row("router", status["router"], sum(sizes) if sizes else "-")]
    lines += [
        f"partition: {'sizes ' + ', '.join(map(str, sizes)) if sizes else 'not yet'}",
        f"assembled: {'yes' if status['assembled'] else 'no'}",
    ]
    return "\n".join(lines)
