"""The run's manifest: each expert's state, island, latest checkpoint and data fingerprint.

Islands that are separate Ray clusters share nothing but the run's storage; the manifest is where
they (and `archipelago status` and `assemble`) learn what happened to every expert.

Layout: one JSON key per expert, `manifest/expert-<k>.json`, holding its recorded state (pending,
running, done or failed), island, host, latest checkpoint, step, data fingerprint, error and time.

Why two writers never corrupt it:
- every key is written whole (`storage.write_bytes`: a temporary file renamed over the key on
  file systems, one PUT on object stores, which makes it visible all at once), so a reader sees
  the old record or the new one, never half of one;
- two writers never share a key: expert k's record is written only by whoever holds the lease of
  expert k's folder (its trainer, or `assign` while moving it to another island). Islands working
  at once write different keys, so no update is lost to a race, as it would be with one file for
  all experts without a compare-and-swap on every update.

The record is what the writers said; the checkpoints and leases are the truth. `reconcile` gives
what a reader should believe (see `archipelago.platform.status`): an expert is done when its
latest complete checkpoint reached its steps, running while a live trainer holds its lease, and
`interrupted` when its record says running but no live trainer holds the lease (its island died
or was stopped; it resumes from its latest checkpoint wherever it is assigned next).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from archipelago.experts import storage
from archipelago.experts.lease import Holder, Lease, LeaseHeld

MANIFEST_DIR = "manifest"
RECORDED = ("pending", "running", "done", "failed")  # what writers record
STATES = (*RECORDED, "interrupted")  # what readers may see (see `reconcile`)
logger = logging.getLogger(__name__)


def record_uri(run_dir: str, k: int) -> str:
    return storage.join(run_dir, MANIFEST_DIR, f"expert-{k}.json")


def read(run_dir: str, k: int) -> dict[str, Any] | None:
    """Expert k's record, or None when nothing was recorded for it."""
    uri = record_uri(run_dir, k)
    return storage.read_json(uri) if storage.exists(uri) else None


def read_all(run_dir: str) -> dict[int, dict[str, Any]]:
    """Every expert's record, by expert id."""
    folder = storage.join(run_dir, MANIFEST_DIR)
    names = [name for name in storage.list_dir(folder) if name.startswith("expert-") and name.endswith(".json")]
    return {int(name[7:-5]): storage.read_json(storage.join(folder, name)) for name in names}


def write(run_dir: str, k: int, state: str, **fields: Any) -> dict[str, Any]:
    """Record expert k's state over its previous record (call while holding its folder's lease)."""
    if state not in RECORDED:
        raise ValueError(f"unknown expert state {state!r}; one of {', '.join(RECORDED)}")
    record = {**(read(run_dir, k) or {}), **fields, "expert": k, "state": state,
              "updated": datetime.now(UTC).isoformat(timespec="seconds")}
    storage.write_json(record_uri(run_dir, k), record)
    return record


@contextmanager
def training(run_dir: str, k: int, island: str | None) -> Iterator[None]:
    """Expert k recorded as running on `island` while the block runs, then failed if it raises
    (interrupted by Ctrl-C is left as running: readers see it as interrupted once its lease is
    gone). The caller holds the expert's lease and records `done` itself (`finished`)."""
    where = {"island": island} if island else {}  # in process: the island it was assigned to stays
    write(run_dir, k, "running", **where, host=socket.gethostname(), pid=os.getpid(), error=None)
    try:
        yield
    except Exception as error:
        _record_failure(run_dir, k, error)
        raise


def _record_failure(run_dir: str, k: int, error: Exception) -> None:
    """Record expert k failed with `error`. When the storage itself is what failed, the record may
    not be writable: it then stays `running`, which readers see as interrupted once the lease lapses
    (the checkpoints already written stay; the expert resumes from the latest)."""
    try:
        write(run_dir, k, "failed", error=f"{type(error).__name__}: {error}")
    except OSError as unwritable:
        logger.error("expert %d failed (%s) and its state could not be recorded: %s", k, error, unwritable)


def finished(run_dir: str, k: int, checkpoint: str, step: int) -> dict[str, Any]:
    """Record expert k done at `checkpoint` (its step and data fingerprint read from its meta);
    a record that says so already is left as it is (a resumed, finished expert writes nothing)."""
    record = read(run_dir, k) or {}
    if record.get("state") == "done" and (record.get("checkpoint"), record.get("step")) == (
            storage.base_name(checkpoint), step):
        return record
    meta = storage.read_json(storage.join(checkpoint, "meta.json"))
    return write(run_dir, k, "done", checkpoint=storage.base_name(checkpoint), step=step,
                 data_fingerprint=meta.get("data_fingerprint"))


def assign(run_dir: str, expert_folders: dict[int, str], island: str) -> None:
    """Assign experts to `island` (pending there), taking each expert's lease to do it: an expert that
    a live trainer holds anywhere is a LeaseHeld error naming that trainer, and nothing is changed
    for it. A trainer that died (its lease expired, or its process is gone on this host) does not
    hold it, so an expert of a lost island can be moved to another."""
    for k, folder in sorted(expert_folders.items()):
        try:
            with Lease(folder, f"assigning expert {k} to island {island}"):
                previous = read(run_dir, k) or {}
                if previous.get("island") != island or previous.get("state") != "done":
                    write(run_dir, k, "pending", island=island, moved_from=previous.get("island"), error=None)
        except LeaseHeld as error:
            raise LeaseHeld(f"expert {k} cannot move to island {island}: {error}") from None


def reconcile(record: dict[str, Any] | None, step: int | None, steps: int, trainer: Holder | None) -> str:
    """What a reader should believe of an expert (see the module docstring)."""
    if step is not None and step >= steps:
        return "done"
    if trainer is not None and not trainer.stale(time.time()):
        return "running"
    recorded = (record or {}).get("state")
    if recorded == "running":
        return "interrupted"
    if recorded == "failed":
        return "failed"
    return "pending"
