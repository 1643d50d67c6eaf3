"""Ensemble versions: every assembled ensemble of a run, what it holds and what changed.

    ensembles/v<N>.json   version N: its experts (ids, checkpoints, data fingerprints), router,
                          cluster sizes and statistics, the partition generation, the version it
                          follows and what changed from it
    ensemble.json         a copy of the newest version (what `load_ensemble` reads by default)

`record` adds a version only when the assembled ensemble differs from the newest one (another
checkpoint, expert or router), so resuming a finished fit adds none. When an expert is removed,
the versions that hold it are withdrawn: their files stay as the run's history, with the reason,
but they cannot be loaded, because that expert's weights and data are gone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from archipelago.experts import storage

VERSIONS_DIR = "ensembles"
ENSEMBLE_FILE = "ensemble.json"
_HISTORY_KEYS = ("version", "parent", "change", "at", "withdrawn")  # not part of what a version holds


class WithdrawnVersion(ValueError):
    """A version whose experts were removed."""


def _uri(run_dir: str, version: int) -> str:
    return storage.join(run_dir, VERSIONS_DIR, f"v{version}.json")


def expert_ids_of(version: dict[str, Any]) -> list[int]:
    """The run's expert id of each expert of a version (0..K-1 before versions recorded them)."""
    return version.get("expert_ids", list(range(len(version["experts"]))))


def numbers(run_dir: str) -> list[int]:
    """The run's version numbers, oldest first."""
    names = storage.list_dir(storage.join(run_dir, VERSIONS_DIR))
    return sorted(int(name[1:-5]) for name in names if name.startswith("v") and name.endswith(".json"))


def history(run_dir: str) -> list[dict[str, Any]]:
    """Every version, oldest first."""
    return [storage.read_json(_uri(run_dir, n)) for n in numbers(run_dir)]


def _content(ensemble: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ensemble.items() if k not in _HISTORY_KEYS}


def record(run_dir: str, ensemble: dict[str, Any]) -> dict[str, Any]:
    """The newest version if it holds `ensemble`, else a new version of it (written, and copied
    to ensemble.json)."""
    done = numbers(run_dir)
    previous = storage.read_json(_uri(run_dir, done[-1])) if done else None
    if previous is not None and _content(previous) == _content(ensemble) and not previous.get("withdrawn"):
        return previous
    version = {**_content(ensemble), "version": (done[-1] if done else 0) + 1,
               "parent": previous["version"] if previous else None, "change": change(previous, ensemble),
               "at": datetime.now(UTC).isoformat(timespec="seconds")}
    storage.write_json(_uri(run_dir, version["version"]), version)
    storage.write_json(storage.join(run_dir, ENSEMBLE_FILE), version)
    return version


def change(previous: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What `new` changes from `previous`, in words."""
    if previous is None:
        return "first assembly"
    before = dict(zip(expert_ids_of(previous), previous["experts"], strict=True))
    after = dict(zip(new["expert_ids"], new["experts"], strict=True))
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    trained = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    parts = []
    if added:
        parts.append(f"added experts {added}")
    if removed:
        parts.append(f"removed experts {removed}")
    if trained:
        parts.append(f"experts {trained} trained on")
    if previous.get("router") != new.get("router"):
        parts.append("router retrained" if new.get("generation") != previous.get("generation") else "router trained on")
    return "; ".join(parts) or "no change"


def load(run_dir: str, version: int | None = None) -> dict[str, Any]:
    """Version `version` (None: the newest, ensemble.json); a withdrawn one is an error saying why."""
    uri = storage.join(run_dir, ENSEMBLE_FILE) if version is None else _uri(run_dir, version)
    if not storage.exists(uri):
        if version is None:
            raise FileNotFoundError(f"{run_dir} has no {ENSEMBLE_FILE}: the run is not assembled yet")
        raise ValueError(f"{run_dir} has no ensemble version {version}; it has versions {numbers(run_dir)}")
    saved = storage.read_json(uri)
    if saved.get("withdrawn"):
        raise WithdrawnVersion(f"ensemble version {version} of {run_dir} was withdrawn: {saved['withdrawn']}")
    return saved


def withdraw(run_dir: str, expert: int, reason: str) -> list[int]:
    """Mark every version holding `expert` withdrawn; their numbers."""
    withdrawn = []
    for saved in history(run_dir):
        if expert in expert_ids_of(saved) and not saved.get("withdrawn"):
            storage.write_json(_uri(run_dir, saved["version"]), {**saved, "withdrawn": reason})
            withdrawn.append(saved["version"])
    return withdrawn
