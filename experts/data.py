"""Training samples batched by index: dense (fixed-size), ragged (variable-size), and read in blocks.

A domain turns its Arrow records into one of these; training then draws batches by sample index.
`fingerprint()` is a content hash saved with every checkpoint, so that a resumed or reloaded expert
can be checked against the data it was trained on.

Data larger than memory is stored as several Parquet shards (blocks). `StreamedSamples` reads them
one block at a time, `Blocked` holds the same blocks in memory, and `batch_ids` draws every batch
from one block in a schedule that depends only on the block sizes, the step and the seed: both give
the same batches, so the same weights, and a resumed training draws what it would have drawn.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from archipelago.experts.batch import Batch, Layout, num_samples, select


def hash_tensors(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]


class Samples(ABC):
    """A data set of N samples that yields batches by index."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batch(self, ids: Tensor) -> Batch:
        """The batch of the samples `ids` (a LongTensor of sample indices)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short content hash of the samples."""

    def block_sizes(self) -> list[int]:
        """The sizes of the blocks (shards) the samples are stored in, in order; one when in memory."""
        return [len(self)]


class DenseSamples(Samples):
    """Samples whose tensors all have one row per sample."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        sizes = {name: value.shape[0] for name, value in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"dense sample tensors disagree on the number of samples: {sizes}")
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def batch(self, ids: Tensor) -> Batch:
        return {name: value[ids] for name, value in self.tensors.items()}

    def fingerprint(self) -> str:
        return hash_tensors(self.tensors)


class RaggedSamples(Samples):
    """Samples of variable size: `ragged` tensors stack the rows of all samples in order, `sizes`
    gives each sample's row count, `dense` tensors have one row per sample. A batch carries the
    index tensor `index` that maps each ragged row to its sample in the batch."""

    def __init__(self, ragged: Mapping[str, Tensor], sizes: Tensor, dense: Mapping[str, Tensor] | None = None,
                 index: str = "batch"):
        total = int(sizes.sum())
        bad = {name: v.shape[0] for name, v in ragged.items() if v.shape[0] != total}
        if bad:
            raise ValueError(f"ragged tensors must have sum(sizes) = {total} rows, got {bad}")
        self.ragged, self.sizes, self.dense, self.index = dict(ragged), sizes.long(), dict(dense or {}), index
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def batch(self, ids: Tensor) -> Batch:
        counts = self.sizes[ids]
        starts_in_batch = torch.cumsum(counts, 0) - counts
        local = torch.arange(int(counts.sum())) - torch.repeat_interleave(starts_in_batch, counts)
        rows = torch.repeat_interleave(self.offsets[ids], counts) + local
        out = {name: value[rows] for name, value in self.ragged.items()}
        out.update({name: value[ids] for name, value in self.dense.items()})
        out[self.index] = torch.repeat_interleave(torch.arange(len(ids)), counts)
        return out

    def fingerprint(self) -> str:
        return hash_tensors({**self.ragged, **self.dense, "__sizes__": self.sizes})


class BatchSamples(Samples):
    """Samples held as one batch of any layout (dense, ragged levels, links), selected by `batch.select`."""

    def __init__(self, batch: Batch, layout: Layout):
        self.whole, self.layout = dict(batch), layout
        self.n = num_samples(self.whole, layout)

    def __len__(self) -> int:
        return self.n

    def batch(self, ids: Tensor) -> Batch:
        return select(self.whole, self.layout, ids)[0]

    def fingerprint(self) -> str:
        return hash_tensors(self.whole)


class LevelSamples(Samples):
    """Samples with one or more variable-size levels (nodes and edges, say), dense tensors beside them.

    `levels` maps each level's index name to (its tensors stacked over all samples, per-sample row
    counts); `links` maps a tensor to the level whose rows it numbers, with each sample's values
    counted from 0 within that sample (an edge (0, 2) joins the sample's first and third node). A
    batch renumbers links to rows of the batch, so they can index the batch's tensors directly.
    """

    def __init__(self, levels: Mapping[str, tuple[Mapping[str, Tensor], Tensor]],
                 dense: Mapping[str, Tensor] | None = None, links: Mapping[str, str] | None = None):
        self.levels = {index: RaggedSamples(tensors, sizes, index=index) for index, (tensors, sizes) in levels.items()}
        counts = {index: len(level) for index, level in self.levels.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"levels disagree on the number of samples: {counts}")
        self.dense, self.links = dict(dense or {}), dict(links or {})

    def __len__(self) -> int:
        return len(next(iter(self.levels.values())))

    def batch(self, ids: Tensor) -> Batch:
        out = {name: value[ids] for name, value in self.dense.items()}
        for level in self.levels.values():
            out.update(level.batch(ids))
        for name, index in self.links.items():
            counts = self.levels[index].sizes[ids]
            starts = torch.cumsum(counts, 0) - counts  # first row of each sample in the batch's level
            owner = out[self._level_of(name)]
            out[name] = out[name] + starts[owner].reshape(-1, *([1] * (out[name].dim() - 1)))
        return out

    def _level_of(self, name: str) -> str:
        return next(index for index, level in self.levels.items() if name in level.ragged)

    def fingerprint(self) -> str:
        tensors = dict(self.dense)
        for index, level in self.levels.items():
            tensors.update({f"{index}/{k}": v for k, v in level.ragged.items()} | {f"{index}/__sizes__": level.sizes})
        return hash_tensors(tensors)


def batch_ids(blocks: Sequence[int], step: int, batch_size: int, generator: torch.Generator, seed: int) -> Tensor:
    """The sample ids of training step `step`, drawn with replacement by `generator`.

    One block: uniformly from all samples. Several blocks: every batch from one block, each pass
    over the data visiting the blocks in a random order with ceil(size / batch_size) steps each, so
    a reader holds one block at a time and every sample is drawn about equally often. The order of
    a pass is seeded by (seed, pass) alone, so resuming needs no state beyond the generator's.
    """
    if len(blocks) == 1:
        return torch.randint(blocks[0], (batch_size,), generator=generator)
    steps = [-(-size // batch_size) for size in blocks]
    sweep, within = divmod(step, sum(steps))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed * 1_000_003 + sweep))
    for block in order.tolist():
        if within < steps[block]:
            break
        within -= steps[block]
    start = sum(blocks[:block])
    return start + torch.randint(blocks[block], (batch_size,), generator=generator)


def _blocks_fingerprint(batches: Iterable[Batch]) -> str:
    """The fingerprint of samples stored in several blocks, from each whole block's batch: the same
    whether the blocks are read one by one or held together."""
    return hashlib.sha256(",".join(hash_tensors(batch) for batch in batches).encode()).hexdigest()[:16]


class Blocked(Samples):
    """Samples held in memory that were stored in blocks of `sizes`: batches follow the blocks as
    `StreamedSamples` of the same blocks would (see `batch_ids`), with the same fingerprint."""

    def __init__(self, samples: Samples, sizes: Sequence[int]):
        if sum(sizes) != len(samples):
            raise ValueError(f"blocks of {sum(sizes)} samples in all for {len(samples)} samples")
        self.inner, self.sizes = samples, list(sizes)

    def __len__(self) -> int:
        return len(self.inner)

    def batch(self, ids: Tensor) -> Batch:
        return self.inner.batch(ids)

    def block_sizes(self) -> list[int]:
        return self.sizes

    def fingerprint(self) -> str:
        if len(self.sizes) == 1:
            return self.inner.fingerprint()
        starts = [sum(self.sizes[:b]) for b in range(len(self.sizes))]
        return _blocks_fingerprint(self.inner.batch(torch.arange(start, start + size))
                                   for start, size in zip(starts, self.sizes, strict=True))


class Pooled(Samples):
    """Samples stored in blocks but drawn as one pool: every batch uniformly from all of them, with
    the blocks' fingerprint. For the router, whose blocks are the partitions' shards: batches from
    one block would each hold a single cluster, and a router trained on them learns nothing but a
    drifting prior (on Stocks its p(k | x_t, t) came out the same for every input)."""

    def __init__(self, blocked: Blocked):
        self.inner = blocked

    def __len__(self) -> int:
        return len(self.inner)

    def batch(self, ids: Tensor) -> Batch:
        return self.inner.batch(ids)

    def block_sizes(self) -> list[int]:
        return [len(self.inner)]

    def fingerprint(self) -> str:
        return self.inner.fingerprint()


class StreamedSamples(Samples):
    """Samples read block by block: `load(b)` gives block b (of `sizes[b]` samples, e.g. one
    Parquet shard); only the block read last is held. A batch must lie in one block, as the
    batches of `batch_ids` do."""

    def __init__(self, sizes: Sequence[int], load: Callable[[int], Samples]):
        self.sizes, self.load = list(sizes), load
        self.ends = torch.cumsum(torch.tensor(self.sizes), 0)
        self._held: tuple[int, Samples] | None = None

    def __len__(self) -> int:
        return sum(self.sizes)

    def block_sizes(self) -> list[int]:
        return self.sizes

    def block(self, b: int) -> Samples:
        """Block b's samples (read unless it is the block held)."""
        if self._held is None or self._held[0] != b:
            samples = self.load(b)
            if len(samples) != self.sizes[b]:
                raise ValueError(f"block {b} holds {len(samples)} samples, {self.sizes[b]} were expected")
            self._held = (b, samples)
        return self._held[1]

    def batch(self, ids: Tensor) -> Batch:
        blocks = torch.searchsorted(self.ends, ids, right=True).unique()
        if len(blocks) != 1:
            raise ValueError(f"a batch of streamed samples must lie in one block, got blocks {blocks.tolist()}")
        b = int(blocks[0])
        return self.block(b).batch(ids - (int(self.ends[b]) - self.sizes[b]))

    def fingerprint(self) -> str:
        if len(self.sizes) == 1:
            return self.block(0).fingerprint()
        return _blocks_fingerprint(self.block(b).batch(torch.arange(size)) for b, size in enumerate(self.sizes))
