"""Expert and router checkpoints: weights in safetensors plus a JSON file of the full config.

Layout under a checkpoint folder (any storage URI):

    step-00000500/model.safetensors   raw and EMA weights ("model." / "ema." prefixes)
    step-00000500/state.safetensors   optimizer moments and random-generator state
    step-00000500/meta.json           config, domain, partition, prediction type, seed, step,
                                      data fingerprint, optimizer hyper-parameters
    LATEST                            the name of the newest complete checkpoint

A checkpoint is complete once LATEST names it: its files are all written before LATEST moves.
Nothing is ever unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from archipelago.experts import storage

LATEST = "LATEST"


@dataclass(frozen=True)
class Checkpoint:
    """The tensors and metadata of one saved step."""

    uri: str
    model: dict[str, Tensor]
    state: dict[str, Tensor]
    meta: dict[str, Any]


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(folder: str, step: int, model: dict[str, Tensor], state: dict[str, Tensor],
                    meta: dict[str, Any]) -> str:
    """Write one checkpoint and then point LATEST at it; returns its URI."""
    uri = storage.join(folder, step_name(step))
    storage.write_bytes(storage.join(uri, "model.safetensors"), save_tensors(_contiguous(model)))
    storage.write_bytes(storage.join(uri, "state.safetensors"), save_tensors(_contiguous(state)))
    storage.write_json(storage.join(uri, "meta.json"), {**meta, "step": step})
    storage.write_bytes(storage.join(folder, LATEST), step_name(step).encode())
    return uri


def latest_checkpoint(folder: str) -> str | None:
    """The URI of the newest complete checkpoint in `folder`, or None."""
    pointer = storage.join(folder, LATEST)
    if not storage.exists(pointer):
        return None
    return storage.join(folder, storage.read_bytes(pointer).decode().strip())


def load_checkpoint(uri: str, with_state: bool = True) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`."""
    meta = storage.read_json(storage.join(uri, "meta.json"))
    model = load_tensors(storage.read_bytes(storage.join(uri, "model.safetensors")))
    state = load_tensors(storage.read_bytes(storage.join(uri, "state.safetensors"))) if with_state else {}
    return Checkpoint(uri=uri, model=model, state=state, meta=meta)


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}


def ema_weights(uri: str) -> dict[str, Tensor]:
    """The EMA weights of a checkpoint, named as the module's state dict: what sampling uses."""
    model = load_checkpoint(uri, with_state=False).model
    return {name.removeprefix("ema."): value for name, value in model.items() if name.startswith("ema.")}
