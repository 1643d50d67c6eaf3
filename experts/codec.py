"""The latent stage: a codec (autoencoder) between records and the diffused fields (latent diffusion).

A domain with a codec (`Domain.codec_network()`) has records in one space and diffuses fields in
another: the codec's `encode(batch) -> latents` and `decode(latents) -> batch` map between them, and
its `loss(batch, generator)` trains it (random draws, such as a VAE's posterior sample, from `generator`,
so that resume is exact). The codec is trained once per run on all records (it is shared by every
expert, as a latent-diffusion VAE is), with the same loop, checkpoints and exact resume as experts;
latents are then computed once and stored beside the records, so no expert ever recomputes them. A
codec with no trainable parameters (a user's pretrained autoencoder, kept frozen) is not trained: its
weights are stored as the checkpoint of step 0, so the run holds them like any other.

Latents are dense tensors, stored as Arrow fixed-size lists with each tensor's shape and dtype in the
schema metadata (`latents_to_table`, `table_to_latents`). Per-sample tensors of the records that are
not codec inputs (conditions) travel with the latents unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from archipelago.experts.batch import Batch
from archipelago.experts.checkpoint import ema_weights, latest_checkpoint, save_checkpoint
from archipelago.experts.data import DenseSamples, Samples
from archipelago.experts.domain import Domain
from archipelago.experts.training import OnLog, TrainConfig, TrainResult, run_training, seeded

SHAPES_KEY = b"archipelago.tensor_shapes"  # schema metadata: JSON {name: [shape, dtype]}


def train_codec(config: TrainConfig, domain: Domain, samples: Samples, folder: str, on_log: OnLog | None = None,
                **loop: object) -> TrainResult:
    """Train (or resume) the domain's codec on all records, checkpointing to `folder`; a frozen codec is
    stored as it is (step 0)."""
    codec = seeded(_network(domain), config.seed)
    meta = {"kind": "codec", "domain": domain.name, "domain_config": domain.to_config(), "config": {}}
    if not any(p.requires_grad for p in codec.parameters()):
        return _store_frozen(codec, samples, config, folder, meta)

    def loss_fn(model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        return model.loss(batch, generator)

    return run_training(codec, loss_fn, samples, config, folder, meta, on_log, description="codec", **loop)


def _store_frozen(codec: nn.Module, samples: Samples, config: TrainConfig, folder: str,
                  meta: dict[str, object]) -> TrainResult:
    """A frozen codec's weights as step 0 (its own EMA), once; the data fingerprint is saved as for a trained one."""
    if (found := latest_checkpoint(folder)) is None:
        weights = {f"{prefix}.{k}": v.clone() for k, v in codec.state_dict().items() for prefix in ("model", "ema")}
        full = {**meta, "config": config.model_dump(mode="json"), "seed": config.seed,
                "data_fingerprint": samples.fingerprint()}
        found = save_checkpoint(folder, 0, weights, {}, full)
    return TrainResult(checkpoint=found, steps=0, resumed_from=0, final_loss=float("nan"))


def _network(domain: Domain) -> Callable[[], nn.Module]:
    if domain.codec_network() is None:
        raise ValueError(f"the {domain.name} domain has no codec")
    return domain.codec_network


def load_codec(domain: Domain, checkpoint: str, device: torch.device | str = "cpu") -> nn.Module:
    """The codec of a checkpoint with its EMA weights, ready to encode and decode."""
    codec = _network(domain)()
    codec.load_state_dict(ema_weights(checkpoint))
    return codec.to(device).eval()


def encode_samples(codec: nn.Module, samples: Samples, batch_size: int = 1024) -> Batch:
    """Latents of every sample, in order, with the samples' other per-sample tensors (conditions) kept."""
    parts = []
    device = next(codec.parameters()).device
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = samples.batch(torch.arange(start, min(start + batch_size, len(samples))))
            latents = codec.encode({k: v.to(device) for k, v in batch.items()})
            kept = {name: value for name, value in batch.items() if name not in codec.inputs}
            parts.append({**kept, **{k: v.cpu() for k, v in latents.items()}})
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def latents_to_table(latents: Batch) -> pa.Table:
    """Dense tensors [N, ...] as a table: one fixed-size-list column per tensor, shapes in the metadata."""
    columns, shapes = {}, {}
    for name, value in sorted(latents.items()):
        flat = value.detach().cpu().reshape(len(value), -1).numpy()
        width = max(flat.shape[1], 1)
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)
        shapes[name] = [list(value.shape[1:]), str(value.dtype).removeprefix("torch.")]
    table = pa.table(columns)
    return table.replace_schema_metadata({SHAPES_KEY: json.dumps(shapes)})


def table_to_latents(table: pa.Table) -> Batch:
    """The inverse of `latents_to_table`."""
    metadata = table.schema.metadata or {}
    if SHAPES_KEY not in metadata:
        raise ValueError(f"table has no {SHAPES_KEY.decode()!r} metadata: not a table of latents")
    out = {}
    for name, (shape, dtype) in json.loads(metadata[SHAPES_KEY]).items():
        values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        array = np.asarray(values).reshape(table.num_rows, *shape)
        out[name] = torch.from_numpy(array.copy()).to(getattr(torch, dtype))
    return out


def latent_samples(table: pa.Table) -> DenseSamples:
    """Stored latents as the samples an expert trains on."""
    return DenseSamples(table_to_latents(table))
