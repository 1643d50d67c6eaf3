"""The command line's settings: a YAML file, `--set` overrides and flags, resolved into one
validated RunConfig, a run directory and a Launch; the plan that `--dry-run` prints; and the
sampling flags, one per SampleRequest field.

A settings file holds the RunConfig fields (the run's identity, saved in run.json; each documented
on its pydantic model in `archipelago.platform.config`), `run_dir` (any storage URI), and
optionally the Launch fields of `archipelago.platform.runner` (where the work runs and is tracked,
free to change between resumptions).

Precedence: the file, then each `--set dotted.key=value` in order (applied with OmegaConf; values
read as YAML scalars or flow collections, numbers in the key index into lists: `--set
expert.steps=200`, `--set placement.0.island=a`, `--set 'placement=[{island: a}]'`), then the named
flags (`--run-dir`, `--experts`, `--device`, ...). Every mistake raises ConfigError with one line
naming the key and where its value came from: the last `--set` or flag that wrote it (`--set
expert.steps: ...`, `--experts: ...`), else the file (`run.yaml: expert.steps: ...`). Settings that
hold a credential are refused the same way (`archipelago.platform.credentials`), the value masked.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from archipelago.experts.domain import Domain
from archipelago.platform import credentials
from archipelago.platform.config import RunConfig, describe, on_device, validate_domain
from archipelago.platform.runner import Launch
from archipelago.router.ensemble import Strategy
from archipelago.router.sampling import SampleRequest

RUN_DIR = "run_dir"
LAUNCH_KEYS = tuple(f.name for f in dataclasses.fields(Launch))
SET_FLAG = "--set"
# Settings keys whose flag is not `--<key with dashes>`.
_FLAG_NAMES = {"island_wait_s": "--island-wait", "ray": "--in-process", "track": "--no-tracking"}


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


def apply_sets(raw: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """`raw` with each `dotted.key=value` override applied in order (see the module docstring)."""
    if not assignments:
        return raw
    try:
        merged = OmegaConf.create(raw)
    except OmegaConfBaseException as error:
        raise ConfigError(f"--set: the settings hold a value OmegaConf cannot take: {_one_line(str(error))}") from error
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {assignment!r}: expected dotted.key=value, e.g. expert.steps=200")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {assignment!r}: invalid value: {_one_line(str(error))}") from error
        try:
            OmegaConf.update(merged, key, value, merge=False)
        except (OmegaConfBaseException, ValueError) as error:
            raise ConfigError(f"--set {key}: {_one_line(str(error)).split(' full_key:')[0]}") from error
    return OmegaConf.to_container(merged, resolve=False)


def resolve(
    path: str | None, overrides: Mapping[str, Any], sets: Sequence[str] = (), inline: str | None = None
) -> Settings:
    """Settings from a config file (or `inline` JSON/YAML text), `--set` overrides, then flags
    (`overrides`, by settings key; None: not given)."""
    source = path or ("--config-json" if inline is not None else "command line")
    if inline is not None:
        raw = parse_mapping(inline, source)
    elif path:
        raw = read_config_file(path)
    else:
        raw = {}
    raw = apply_sets(raw, sets)
    flags = {key: value for key, value in overrides.items() if value is not None}
    raw.update(flags)
    writes = [(assignment.partition("=")[0], SET_FLAG) for assignment in sets]
    where = origin_namer(source, writes + [(key, _FLAG_NAMES.get(key, _flag(key))) for key in flags])
    try:
        credentials.check(raw, where)  # before validation, whose errors may echo a value
    except credentials.SecretInConfig as error:
        raise ConfigError(str(error)) from error
    run_dir = raw.pop(RUN_DIR, None)
    if not run_dir:
        raise ConfigError(f"{source}: no run_dir: set run_dir in the config file or pass --run-dir")
    launch_raw = {key: raw.pop(key) for key in LAUNCH_KEYS if key in raw}
    try:
        config = RunConfig(**raw)
        launch = pydantic.TypeAdapter(Launch).validate_python(launch_raw)
    except pydantic.ValidationError as error:
        raise ConfigError(describe(error, key=where)) from error
    if config.data is None:
        raise ConfigError(f"{source}: no data: set data in the config file or pass --data (a path or sines:N)")
    return Settings(config=config, run_dir=str(run_dir), launch=launch, domain=_domain(config, where))


def origin_namer(source: str, writes: Sequence[tuple[str, str]]) -> Callable[[str], str]:
    """How an error names a dotted settings key, for `describe(error, key=...)`: by the last of
    `writes` (dotted key, flag; in the order applied) that wrote the key, a key above it or one below
    it (`--experts`, `--set placement.0.gpus`), else by `source` (`run.yaml: expert.steps`)."""

    def name(location: str) -> str:
        for key, flag in reversed(writes):
            if _overlaps(key, location):
                return f"{flag} {location}" if flag == SET_FLAG else flag
        return f"{source}: {location}"

    return name


def _overlaps(key: str, location: str) -> bool:
    """Whether writing `key` set `location`, or made it (an unknown `expertz` from `expertz.steps`)."""
    return key == location or location.startswith(f"{key}.") or key.startswith(f"{location}.")


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def _domain(config: RunConfig, where: Callable[[str], str]) -> Domain:
    """The validated domain; its errors name domain_config's keys (or `domain`) by their origin."""
    try:
        return validate_domain(config)
    except ValueError as error:
        cause = error.__cause__  # validate_domain chains the domain's own error; an unknown domain has none
        if isinstance(cause, pydantic.ValidationError):
            named = describe(cause, key=lambda location: where(f"domain_config.{location}"))
            raise ConfigError(f"{named}, in the domain_config of domain {config.domain!r}") from error
        key = "domain_config" if isinstance(cause, ValueError) else "domain"
        raise ConfigError(f"{where(key)}: {_one_line(str(error))}") from error


def settings_flags(p: argparse.ArgumentParser, ray: bool = True, launch: bool = True) -> None:
    """The flags that override the settings file: the run's own, then (`ray`) where it runs and
    (`launch`) how it is tracked."""
    p.add_argument("config", nargs="?", help="YAML settings file: RunConfig fields, run_dir, Launch fields")
    p.add_argument("--config-json", metavar="JSON", help="the settings inline as JSON (what submit passes on)")
    p.add_argument("--run-dir", help="run directory: a local path or a storage URI (s3://...)")
    p.add_argument("--data", help="data source: a .csv/.parquet path or sines:N")
    p.add_argument("--experts", type=int, help="K, the number of partitions and experts")
    p.add_argument("--seed", type=int, help="the run seed")
    p.add_argument("--device", help="torch device of every training (cpu, cuda, cuda:1; default: CUDA when present)")
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
    if args.device is not None:
        s = dataclasses.replace(s, config=on_device(s.config, args.device))
    if absolute and "://" not in s.run_dir:
        return dataclasses.replace(s, run_dir=os.path.abspath(s.run_dir))
    return s


def _one_line(text: str) -> str:
    return " ".join(text.split())


def to_yaml(settings: Settings) -> str:
    return yaml.safe_dump(settings.as_dict(), sort_keys=False)


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


# --- sampling: the flags of a SampleRequest -------------------------------------------------------

# SampleRequest fields with a flag of their own shape (or none: `progress` follows the terminal).
_OWN_FLAGS = ("n", "conditions", "given", "progress")


def sample_flags(p: argparse.ArgumentParser) -> None:
    """One flag per SampleRequest field, its help the field's description. Every default is None:
    what is not given falls back to SampleRequest's default, the same as in the SDK and the MLflow
    model."""
    p.add_argument("-n", type=int, help=f"{SampleRequest.model_fields['n'].description} (default 16)")
    for name, field in SampleRequest.model_fields.items():
        if name in _OWN_FLAGS:
            continue
        kind = field.annotation if isinstance(field.annotation, type) else str
        extra = {"choices": [s.value for s in Strategy]} if kind is Strategy else {"type": kind}
        default = field.default.value if isinstance(field.default, Strategy) else field.default
        p.add_argument(f"--{name.replace('_', '-')}", help=f"{field.description} (default {default})", **extra)
    p.add_argument("--condition", action="append", default=[], metavar="NAME=VALUE",
                   help="a condition for every sample (VALUE read as YAML), or one per sample from a .npy file; "
                        "repeatable")
    p.add_argument("--given", action="append", default=[], metavar="FIELD=FILE.npy",
                   help="values of a field fixed by you (NaN, or -1 for categories, where free); repeatable")


def _assignments(flag: str, items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def _array(flag: str, name: str, path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{flag} {name}={path}: cannot read a .npy array: {_one_line(str(error))}") from error


def _condition_value(name: str, text: str) -> Any:
    if text.endswith(".npy"):
        return _array("--condition", name, text)
    return _yaml_value("--condition", name, text)


def _yaml_value(flag: str, name: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{flag} {name}={text}: invalid value: {_one_line(str(error))}") from error


def yaml_assignments(flag: str, items: Sequence[str]) -> dict[str, Any]:
    """Repeated NAME=VALUE flags as a mapping, each VALUE read as YAML; a bad one is a ConfigError naming it."""
    return {name: _yaml_value(flag, name, text) for name, text in _assignments(flag, items).items()}


def request_from_args(args: argparse.Namespace) -> SampleRequest:
    """The SampleRequest of the sampling flags; a bad flag is a ConfigError naming it."""
    values = {name: getattr(args, name) for name in SampleRequest.model_fields if name not in _OWN_FLAGS}
    values = {name: value for name, value in values.items() if value is not None}
    if args.n is not None:
        values["n"] = args.n
    values["conditions"] = {k: _condition_value(k, v) for k, v in _assignments("--condition", args.condition).items()}
    values["given"] = {k: _array("--given", k, v) for k, v in _assignments("--given", args.given).items()}
    values["progress"] = sys.stderr.isatty()
    try:
        return SampleRequest(**values)
    except pydantic.ValidationError as error:
        flag = lambda where: "-n" if where == "n" else f"--{where.replace('_', '-')}"  # noqa: E731
        raise ConfigError(describe(error, key=flag)) from error
