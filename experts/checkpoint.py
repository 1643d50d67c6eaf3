"""Expert and router checkpoints: weights in safetensors plus a JSON file of the full config.

Layout under a checkpoint folder (any storage URI):

    step-00000500/model.safetensors   raw and EMA weights ("model." / "ema." prefixes)
    step-00000500/state.safetensors   optimizer moments and random-generator state
    step-00000500/meta.json           config, domain, partition, prediction type, seed, step,
                                      data fingerprint, optimizer hyper-parameters
    LATEST                            the name of the newest complete checkpoint

A checkpoint is complete once LATEST names it: its files are all written before LATEST moves.
meta.json holds the sha256 of each tensor file, and loading verifies it, so a truncated or
overwritten file is a `DamagedCheckpoint` naming it (never garbage weights); training resumes
from the newest intact checkpoint instead (`latest_intact`). Older step folders are pruned to the
newest `keep` (`prune_checkpoints`). Nothing is ever unpickled: tensors come from safetensors,
everything else from JSON.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from archipelago.experts import storage

LATEST = "LATEST"
STEP_PREFIX = "step-"
TENSOR_FILES = ("model.safetensors", "state.safetensors")

logger = logging.getLogger(__name__)


class DamagedCheckpoint(storage.DamagedFile):
    """A checkpoint file that is truncated, overwritten or unreadable; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    """The tensors and metadata of one saved step."""

    uri: str
    model: dict[str, Tensor]
    state: dict[str, Tensor]
    meta: dict[str, Any]


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def save_checkpoint(folder: str, step: int, model: dict[str, Tensor], state: dict[str, Tensor],
                    meta: dict[str, Any]) -> str:
    """Write one checkpoint (tensor files, then meta.json with their checksums) and then point
    LATEST at it; returns its URI."""
    uri = storage.join(folder, step_name(step))
    checksums = {}
    for name, tensors in zip(TENSOR_FILES, (model, state), strict=True):
        data = save_tensors(_contiguous(tensors))
        storage.write_bytes(storage.join(uri, name), data)
        checksums[name] = hashlib.sha256(data).hexdigest()
    storage.write_json(storage.join(uri, "meta.json"), {**meta, "step": step, "checksums": checksums})
    storage.write_bytes(storage.join(folder, LATEST), step_name(step).encode())
    return uri


def latest_checkpoint(folder: str) -> str | None:
    """The URI of the newest complete checkpoint in `folder`, or None."""
    pointer = storage.join(folder, LATEST)
    if not storage.exists(pointer):
        return None
    return storage.join(folder, storage.read_bytes(pointer).decode().strip())


def load_checkpoint(uri: str, with_state: bool = True) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`, verifying each file against its
    checksum (checkpoints written before checksums existed are only parsed)."""
    try:
        meta = storage.read_json(storage.join(uri, "meta.json"))
    except storage.DamagedFile as error:
        raise DamagedCheckpoint(str(error)) from error
    model = _read_tensors(uri, "model.safetensors", meta)
    state = _read_tensors(uri, "state.safetensors", meta) if with_state else {}
    return Checkpoint(uri=uri, model=model, state=state, meta=meta)


def _read_tensors(uri: str, name: str, meta: dict[str, Any]) -> dict[str, Tensor]:
    file = storage.join(uri, name)
    data = storage.read_bytes(file)
    expected = meta.get("checksums", {}).get(name)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise DamagedCheckpoint(f"{file} is damaged: its sha256 does not match the one in meta.json "
                                f"({len(data)} bytes)")
    try:
        return load_tensors(data)
    except SafetensorError as error:
        raise DamagedCheckpoint(f"{file} is damaged: {error}") from error


def step_folders(folder: str) -> list[str]:
    """The names of the step folders under `folder`, oldest first."""
    return sorted(name for name in storage.list_dir(folder) if name.startswith(STEP_PREFIX))


def latest_intact(folder: str, with_state: bool = True) -> Checkpoint | None:
    """The newest checkpoint of `folder` that loads and verifies, or None when there is none.

    Starts from the one LATEST names; each damaged one on the way is logged as a warning naming
    the file, so that a resumed training loses only the steps since the newest intact checkpoint.
    """
    latest = latest_checkpoint(folder)
    if latest is None:
        return None
    newest = storage.base_name(latest)
    for name in reversed([n for n in step_folders(folder) if n <= newest]):
        try:
            return load_checkpoint(storage.join(folder, name), with_state)
        except (DamagedCheckpoint, FileNotFoundError) as error:
            logger.warning("skipping a damaged checkpoint: %s", error)
    raise DamagedCheckpoint(f"every checkpoint in {folder} is damaged; delete the folder to train from scratch")


def prune_checkpoints(folder: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` step folders (LATEST's is always kept); returns the deleted names."""
    latest = latest_checkpoint(folder)
    names = step_folders(folder)
    doomed = [name for name in names[: max(len(names) - keep, 0)]
              if latest is None or name != storage.base_name(latest)]
    for name in doomed:
        storage.delete_dir(storage.join(folder, name))
    return doomed


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}


def ema_weights(uri: str) -> dict[str, Tensor]:
    """The EMA weights of a checkpoint, named as the module's state dict: what sampling uses."""
    model = load_checkpoint(uri, with_state=False).model
    return {name.removeprefix("ema."): value for name, value in model.items() if name.startswith("ema.")}
