"""Training of one expert: plain PyTorch, one model, one partition, checkpoint and exact resume.

`train_expert` minimizes the flow-matching objective of the domain's fields on one partition
with AdamW, a linear learning-rate warm-up (then constant, so that extending `steps` on resume
changes nothing already done), gradient-norm clipping and EMA weights. `run_training` is the loop
itself, shared with the router's training. Resuming from the latest checkpoint restores weights,
EMA, optimizer moments, generator states and the step, so N steps + resume + N steps give the same
weights, bit for bit, as 2N steps in one go.

Faults: a damaged latest checkpoint is skipped for the newest intact one (a warning names it); a
non-finite loss or gradient stops training with `NonFiniteLoss` before the optimizer step, so the
last checkpoint stays good; SIGINT (in the main thread) finishes the current step, writes a
checkpoint and then raises KeyboardInterrupt. Older checkpoints are pruned to `keep_checkpoints`.

Data parallelism (DDP): when `torch.distributed` is initialized with a world of N > 1 ranks (a
launcher such as Ray Train set it up), the model is wrapped in `DistributedDataParallel`, which
averages the gradients. `batch_size` stays the global batch: every rank draws the same batch_size
sample ids from the shared data stream and trains on its own 1/N of them, with its own noise
stream (rank 0's is the one-worker stream, rank r's derives from the seed and r), so one step is
the same optimization on 1 or N workers, and optimizer and EMA stay identical on every rank. Rank
0 alone writes checkpoints (holding every rank's noise-generator state, gathered, so resuming with
the same N is exact too), prunes, logs and draws the progress bar; every rank resumes from the
latest checkpoint. One worker (no process group): none of this happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from archipelago.experts import storage
from archipelago.experts.batch import Batch
from archipelago.experts.checkpoint import latest_intact, prune_checkpoints, save_checkpoint, step_name
from archipelago.experts.conditions import drop_conditions
from archipelago.experts.conventions import Prediction
from archipelago.experts.data import Samples, batch_ids
from archipelago.experts.denoiser import denoising_loss
from archipelago.experts.domain import Domain, Statistics

LossFn = Callable[[nn.Module, Batch, torch.Generator], Tensor]
OnLog = Callable[[int, dict[str, float]], None]
# Makes the training's progress bar, called like tqdm (iterable, desc, disable, initial, total); the
# bar is iterated and answers set_postfix and close. None: tqdm.auto.tqdm.
ProgressBar = Callable[..., Any]

# Keys that may change between a checkpoint and its resumption; every other key must match.
RESUMABLE_KEYS = frozenset({"steps", "checkpoint_every", "keep_checkpoints", "log_every", "progress"})

logger = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Optimization settings of one training (expert or router)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(2000, ge=1)  # total optimizer steps
    batch_size: int = Field(64, ge=1)  # samples per step, drawn with replacement (split over data-parallel ranks)
    lr: float = Field(1e-3, gt=0)  # AdamW learning rate after warm-up
    weight_decay: float = Field(0.0, ge=0)  # AdamW decoupled weight decay
    warmup_steps: int = Field(100, ge=0)  # linear learning-rate warm-up from 0
    grad_clip: float = Field(1.0, gt=0)  # max global gradient norm
    ema_decay: float = Field(0.999, ge=0, lt=1)  # EMA of weights, with the usual (1+n)/(10+n) warm-up
    checkpoint_every: int = Field(500, ge=1)  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = Field(3, ge=1)  # the newest step folders kept; older ones are deleted
    log_every: int = Field(50, ge=1)  # steps between logged metrics
    condition_dropout: float = Field(0.1, ge=0, le=1)  # chance each condition is dropped to null (guidance)
    seed: int = 0  # seeds the data order and the noise
    device: str | None = None  # None: CUDA when present, else CPU
    progress: bool = True  # show a progress bar


class ExpertConfig(BaseModel):
    """One expert: its partition, its prediction type, and how it trains."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    partition: int = Field(ge=0)  # the cluster this expert learns
    prediction: Prediction = Prediction.VELOCITY  # what the network predicts for continuous fields
    train: TrainConfig = TrainConfig()


class CheckpointMismatch(ValueError):
    """A checkpoint exists but was made with another config or other data."""


class NonFiniteLoss(FloatingPointError):
    """The loss or the gradient became NaN or infinite; the last checkpoint was kept as it was."""


@dataclass(frozen=True)
class TrainResult:
    """Where the final checkpoint is and how training went."""

    checkpoint: str
    steps: int
    resumed_from: int  # 0 when trained from scratch
    final_loss: float


def derive_seed(run_seed: int, *keys: Any) -> int:
    """A seed for one stream (expert k, the router, ...) derived from the run seed."""
    digest = hashlib.sha256(":".join(map(str, (run_seed, *keys))).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a network with its initial weights drawn from `seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def pick_device(requested: str | None) -> torch.device:
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def _lr_at(step: int, config: TrainConfig) -> float:
    return config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr


def _ema_decay_at(step: int, config: TrainConfig) -> float:
    return min(config.ema_decay, (1 + step) / (10 + step))


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel ranks of one training (one worker: rank 0 of 1)."""

    rank: int = 0
    world: int = 1


def data_parallel_ranks() -> Ranks:
    """The rank and world size of torch.distributed's default process group; rank 0 of 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def _noise_seed(seed: int, rank: int) -> int:
    """Rank 0 draws the one-worker noise stream; rank r > 0 its own, derived from the seed and r."""
    return seed + 1 if rank == 0 else derive_seed(seed, "noise", rank)


def _rng_key(name: str, rank: int) -> str:
    """A generator's key in the checkpoint: the data stream is shared by all ranks, noise is per rank."""
    return f"rng.{name}" if rank == 0 or name == "data" else f"rng.{name}.rank{rank}"


def _comm_device(device: torch.device) -> torch.device:
    """Where the tensors of a collective live: NCCL takes CUDA tensors only, gloo CPU ones."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_noise_states(generator: torch.Generator, ranks: Ranks, device: torch.device) -> dict[str, Tensor]:
    """The noise-generator states of ranks 1..N-1, keyed for rank 0's checkpoint (a collective)."""
    if ranks.world == 1:
        return {}
    state = generator.get_state().to(_comm_device(device))
    states = [torch.empty_like(state) for _ in range(ranks.world)]
    dist.all_gather(states, state)
    return {_rng_key("noise", rank): value.cpu() for rank, value in enumerate(states) if rank}


def _mean_over_ranks(value: float, ranks: Ranks, device: torch.device) -> float:
    """The mean of a per-rank number over all ranks (a collective); the number itself on one worker."""
    if ranks.world == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(total)
    return total.item() / ranks.world


def _check_same_start(start: int, ranks: Ranks, device: torch.device, folder: str) -> None:
    """Every rank must resume from the same step: they all read the same storage."""
    if ranks.world == 1:
        return
    bounds = torch.tensor([start, -start], device=_comm_device(device))
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    highest, lowest = int(bounds[0]), -int(bounds[1])
    if highest != lowest:
        raise RuntimeError(f"the {ranks.world} data-parallel ranks found checkpoints of different steps "
                           f"({lowest} to {highest}) in {folder}: every rank must read the same storage")


def _state_tensors(optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator]) -> dict[str, Tensor]:
    tensors = {f"rng.{name}": g.get_state() for name, g in generators.items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    return tensors


def _restore_state(optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator],
                   tensors: dict[str, Tensor], rank: int = 0) -> None:
    for name, g in generators.items():
        key = _rng_key(name, rank)
        if key in tensors:
            g.set_state(tensors[key])
        else:  # saved by fewer data-parallel ranks: this rank's stream goes on from its seed
            logger.warning("the checkpoint holds no %s (it was made by fewer data-parallel workers): rank %d's "
                           "%s stream starts from its seed, so this resume is not exact", key, rank, name)
    saved = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            saved["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(saved)


def check_resumable(meta: dict[str, Any], config: dict[str, Any], fingerprint: str, uri: str,
                    new_data: bool = False) -> None:
    """Raise CheckpointMismatch naming what differs between a checkpoint and this training (with
    `new_data`, other data is expected: the training continues on grown data)."""
    saved = meta.get("config", {})
    differing = sorted(k for k in set(saved) | set(config)
                       if k not in RESUMABLE_KEYS and saved.get(k) != config.get(k))
    if differing:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}" for k in differing)
        raise CheckpointMismatch(f"checkpoint {uri} was made with another config ({details})")
    if meta.get("data_fingerprint") != fingerprint and not new_data:
        raise CheckpointMismatch(
            f"checkpoint {uri} was trained on data {meta.get('data_fingerprint')}, this data is {fingerprint}"
        )


def run_training(model: nn.Module, loss_fn: LossFn, samples: Samples, config: TrainConfig, folder: str,
                 meta: dict[str, Any], on_log: OnLog | None = None, description: str = "train",
                 progress_bar: ProgressBar | None = None, new_data: bool = False) -> TrainResult:
    """The training loop shared by experts and the router (see the module docstring). `new_data`:
    the latest checkpoint was trained on other data (records were added to the partition), and
    training continues from it on these samples up to `config.steps`. Under torch.distributed, the
    ranks train data-parallel (see the module docstring)."""
    ranks = data_parallel_ranks()
    if config.batch_size % ranks.world:
        raise ValueError(f"{description}: batch_size={config.batch_size} does not divide by the {ranks.world} "
                         f"data-parallel workers")
    device = pick_device(config.device)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generators = {"data": torch.Generator().manual_seed(config.seed),
                  "noise": torch.Generator(device=device).manual_seed(_noise_seed(config.seed, ranks.rank))}
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    fingerprint, blocks = samples.fingerprint(), samples.block_sizes()
    full_meta = {**meta, "config": config.model_dump(mode="json") | meta.get("config", {}),
                 "seed": config.seed, "data_fingerprint": fingerprint}
    start, uri = 0, None
    if ranks.world > 1:
        dist.barrier()  # rank 0 holds the folder's lease now: no one else writes while the ranks read
    if (checkpoint := latest_intact(folder)) is not None:
        check_resumable(checkpoint.meta, full_meta["config"], fingerprint, checkpoint.uri, new_data)
        model.load_state_dict({k[6:]: v for k, v in checkpoint.model.items() if k.startswith("model.")})
        ema = {k[4:]: v.to(device) for k, v in checkpoint.model.items() if k.startswith("ema.")}
        _restore_state(optimizer, generators, checkpoint.state, ranks.rank)
        start, uri = checkpoint.meta["step"], checkpoint.uri
        if start > config.steps:
            raise CheckpointMismatch(f"checkpoint {uri} is at step {start}, past steps={config.steps}: steps can "
                                     f"only be raised on resume")
    _check_same_start(start, ranks, device, folder)
    # A parameter that a step leaves unused (a branch of some domain's network) must not stall DDP's reduction.
    forward = model if ranks.world == 1 else DistributedDataParallel(model, find_unused_parameters=True)
    resumed_from, last_loss = start, float("nan")
    window_loss, window_steps, window_start, t0 = 0.0, 0, time.perf_counter(), time.perf_counter()
    bar = (progress_bar or tqdm)(range(start, config.steps), desc=description,
                                 disable=not config.progress or ranks.rank > 0, initial=start, total=config.steps)

    def save(done: int) -> str:
        others = _gather_noise_states(generators["noise"], ranks, device)  # every rank takes part
        if ranks.rank > 0:
            return storage.join(folder, step_name(done))
        weights = {f"model.{k}": v for k, v in model.state_dict().items()}
        weights.update({f"ema.{k}": v for k, v in ema.items()})
        saved = save_checkpoint(folder, done, weights, _state_tensors(optimizer, generators) | others, full_meta)
        prune_checkpoints(folder, config.keep_checkpoints)
        return saved

    # A SIGINT that one rank alone saw would stop it between two collectives: with several ranks,
    # their launcher stops them all.
    interrupts = _interrupt_at_step_boundary() if ranks.world == 1 else contextlib.nullcontext(threading.Event())
    with interrupts as interrupted:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, config)
            ids = batch_ids(blocks, step, config.batch_size, generators["data"], config.seed)
            ids = ids.tensor_split(ranks.world)[ranks.rank]  # this rank's share of the global batch
            batch = {name: value.to(device) for name, value in samples.batch(ids).items()}
            loss = loss_fn(forward, batch, generators["noise"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            last_loss, last_norm = torch.stack([loss.detach(), norm.to(loss.dtype)]).tolist()  # one device sync
            _check_finite(last_loss, last_norm, f"{description}: at step {step + 1}", uri)
            optimizer.step()
            decay = _ema_decay_at(step, config)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    ema[name].lerp_(p.detach(), 1 - decay)
            window_loss, window_steps = window_loss + last_loss, window_steps + 1
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                window_loss = _mean_over_ranks(window_loss, ranks, device)
                elapsed = time.perf_counter() - window_start
                metrics = {"loss": window_loss / window_steps, "lr": _lr_at(step, config),
                           "samples_per_s": window_steps * config.batch_size / max(elapsed, 1e-9),
                           "wall_time": time.perf_counter() - t0}
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if on_log is not None and ranks.rank == 0:
                    on_log(done, metrics)
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if done % config.checkpoint_every == 0 or done == config.steps or interrupted.is_set():
                uri = save(done)
            if interrupted.is_set():
                bar.close()
                raise KeyboardInterrupt(f"{description}: interrupted; checkpoint {uri} holds step {done}")
    bar.close()
    return TrainResult(checkpoint=uri, steps=config.steps, resumed_from=resumed_from,
                       final_loss=_mean_over_ranks(last_loss, ranks, device))


def _check_finite(loss: float, norm: float, where: str, last_checkpoint: str | None) -> None:
    """Stop before an optimizer step that would write NaN or infinite weights."""
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise NonFiniteLoss(f"{where} the loss is {loss} and the gradient norm {norm}; nothing was applied and the "
                            f"last checkpoint ({last_checkpoint or 'none yet'}) is intact. Lower lr or check the "
                            f"data for extreme values")


@contextlib.contextmanager
def _interrupt_at_step_boundary() -> Iterator[threading.Event]:
    """Within the block, a first SIGINT only sets the event (the loop checkpoints and stops after
    the current step); a second one interrupts at once. Outside the main thread (where signal
    handlers cannot be set) the event is never set and SIGINT behaves as usual."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        # A first SIGINT is deferred whatever handler was there before (Python's, or one installed
        # from C, which getsignal reports as None), unless SIGINT was ignored; the second interrupts.
        if previous == signal.SIG_IGN:
            return
        if interrupted.is_set():
            signal.default_int_handler(signum, frame)
        interrupted.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield interrupted
    finally:
        # A handler installed from C (None) cannot be put back from Python; Python's default stands in.
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def train_expert(config: ExpertConfig, domain: Domain, samples: Samples, folder: str,
                 on_log: OnLog | None = None, statistics: Statistics | None = None,
                 progress_bar: ProgressBar | None = None, new_data: bool = False) -> TrainResult:
    """Train one expert on one partition's samples, checkpointing to `folder` (any storage URI)
    and resuming from its latest checkpoint there. Conditions are dropped to null with
    `condition_dropout`, and the domain's `given_masks` fix entries, so that one expert learns
    conditional and unconditional generation and completion together. `statistics` (the
    partition's, for its templates) are saved with every checkpoint. `progress_bar` makes the bar
    (see `ProgressBar`; the platform passes Ray's inside Ray workers). `new_data`: continue from a
    checkpoint trained before records were added (see `run_training`)."""
    net = seeded(domain.denoiser_network, config.train.seed)
    fields, conditions = domain.fields, domain.conditions

    def loss_fn(model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        batch = drop_conditions(batch, conditions, config.train.condition_dropout, generator)
        return denoising_loss(model, fields, batch, generator, config.prediction, domain.given_masks(batch, generator))

    meta = {"kind": "expert", "domain": domain.name, "domain_config": domain.to_config(),
            "partition": config.partition, "prediction": config.prediction.value, "statistics": statistics or {},
            "config": {"partition": config.partition, "prediction": config.prediction.value}}
    return run_training(net, loss_fn, samples, config.train, folder, meta, on_log,
                        description=f"expert {config.partition}", progress_bar=progress_bar, new_data=new_data)
