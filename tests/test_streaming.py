"""Data larger than memory: records and partitions in several Parquet shards, experts and the router
reading them block by block, with the same batches and weights as holding them all in memory."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from archipelago.experts.checkpoint import latest_checkpoint
from archipelago.experts.data import Blocked, DenseSamples, LevelSamples, StreamedSamples, batch_ids
from archipelago.platform import sdk, steps
from tests.toy_graphs import LatentVectorDomain, plane_vectors

TINY = {"steps": 12, "batch_size": 8, "warmup_steps": 2, "progress": False, "checkpoint_every": 5}
DOMAIN = {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1}


def dense(n: int, offset: int = 0) -> DenseSamples:
    return DenseSamples({"x": torch.arange(offset, offset + n, dtype=torch.float32)[:, None]})


def graphs(sizes: list[int]) -> LevelSamples:
    """Samples with a node level and an edge level whose links number the sample's nodes."""
    nodes = torch.tensor(sizes)
    h = torch.cat([torch.arange(n, dtype=torch.float32) * n for n in sizes])
    edges = [(i, i + 1) for n in sizes for i in range(n - 1)]
    return LevelSamples({"node_batch": ({"h": h}, nodes),
                         "edge_batch": ({"edge": torch.tensor(edges)}, nodes - 1)}, links={"edge": "node_batch"})


def streamed(blocks: list[list[int]]) -> StreamedSamples:
    return StreamedSamples([len(b) for b in blocks], lambda b: graphs(blocks[b]))


BLOCKS = [[2, 3, 4], [5, 2], [3, 3, 3, 2]]


def test_one_block_draws_as_before():
    ids = batch_ids([50], step=3, batch_size=7, generator=torch.Generator().manual_seed(1), seed=0)
    assert torch.equal(ids, torch.randint(50, (7,), generator=torch.Generator().manual_seed(1)))


def test_every_batch_lies_in_one_block_and_every_block_is_visited_by_its_size():
    sizes, generator, visits = [30, 10, 20], torch.Generator().manual_seed(0), [0, 0, 0]
    ends = torch.tensor(np.cumsum(sizes))
    for step in range(6 * 3):  # three passes of ceil(size / 10) = 3 + 1 + 2 steps
        blocks = torch.searchsorted(ends, batch_ids(sizes, step, 10, generator, seed=0), right=True).unique()
        assert len(blocks) == 1
        visits[int(blocks[0])] += 1
    assert visits == [9, 3, 6]


def test_streamed_blocks_batch_and_hash_as_the_same_blocks_in_memory():
    together = Blocked(graphs([n for block in BLOCKS for n in block]), [len(b) for b in BLOCKS])
    apart = streamed(BLOCKS)
    assert apart.fingerprint() == together.fingerprint()
    assert streamed([[2, 3, 4], [5, 2], [3, 3, 3, 3]]).fingerprint() != together.fingerprint()
    for ids in (torch.tensor([4, 3, 3]), torch.tensor([5, 8, 6])):  # block 1; block 2 with its links renumbered
        a, b = apart.batch(ids), together.batch(ids)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_streamed_batch_across_blocks_is_refused():
    with pytest.raises(ValueError, match=r"one block, got blocks \[0, 1\]"):
        streamed(BLOCKS).batch(torch.tensor([0, 3]))


def test_a_block_of_another_size_than_recorded_is_an_error():
    with pytest.raises(ValueError, match="block 1 holds 3 samples, 4 were expected"):
        StreamedSamples([2, 4], lambda b: dense([2, 3][b])).batch(torch.tensor([2]))


def test_only_the_block_read_last_is_held():
    loads = []
    samples = StreamedSamples([3, 3], lambda b: loads.append(b) or dense(3, 3 * b))
    for ids in ([0, 1], [2], [4], [5, 3], [1]):
        samples.batch(torch.tensor(ids))
    assert loads == [0, 1, 0]


def _weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(f"{latest_checkpoint(folder)}/model.safetensors")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """The same run twice, records in shards of 20 windows: streamed, and all in memory."""
    root = tmp_path_factory.mktemp("sharded")
    runs = {stream: sdk.fit("sines:120", str(root / f"stream-{stream}"), experts=2, expert=TINY, router=TINY,
                            domain_config=DOMAIN, shard_rows=20, stream=stream)
            for stream in (True, False)}
    return runs


def test_records_and_partitions_are_written_in_shards(sharded_runs):
    run_dir = sharded_runs[True].run_dir
    sizes = steps._shard_sizes(run_dir)
    assert all(len(shards) > 1 and max(shards) <= 20 for shards in sizes)
    assert sum(map(sum, sizes)) == steps.read_records(run_dir).num_rows
    for k, shards in enumerate(sizes):
        assert steps.expert_records(run_dir, k).num_rows == sum(shards)
        assert isinstance(steps.expert_samples(run_dir, k, steps.load_domain(run_dir)), StreamedSamples)


def test_streaming_gives_the_weights_of_the_in_memory_path(sharded_runs):
    streamed_dir, in_memory_dir = sharded_runs[True].run_dir, sharded_runs[False].run_dir
    for folder in (*(f"experts/expert-{k}" for k in range(2)), "router"):
        a, b = _weights(f"{streamed_dir}/{folder}"), _weights(f"{in_memory_dir}/{folder}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def test_a_streamed_fit_resumes_exactly(sharded_runs, tmp_path):
    """Half the steps, then the rest from the checkpoint: the weights of one uninterrupted fit."""
    half = {**TINY, "steps": 5}
    options = {"experts": 2, "router": TINY, "domain_config": DOMAIN, "shard_rows": 20}
    sdk.fit("sines:120", str(tmp_path), expert=half, **options)
    sdk.fit("sines:120", str(tmp_path), expert=TINY, **options)
    a, b = _weights(f"{tmp_path}/experts/expert-0"), _weights(f"{sharded_runs[True].run_dir}/experts/expert-0")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_codec_run_encodes_and_trains_shard_by_shard(tmp_path):
    """Latents are stored one shard per data shard; the experts stream them like records."""
    train = {**TINY, "steps": 4}
    for stream in (True, False):
        sdk.fit(plane_vectors(100), str(tmp_path / f"stream-{stream}"), domain=LatentVectorDomain(), experts=2,
                expert=train, router=train, codec=train, shard_rows=16, stream=stream)
    run_dir = str(tmp_path / "stream-True")
    for k, sizes in enumerate(steps._shard_sizes(run_dir)):
        assert len(sizes) > 1
        for i, size in enumerate(sizes):
            assert steps.read_table(f"{run_dir}/latents/expert={k}/part-{i}.parquet").num_rows == size
    for folder in ("codec", "experts/expert-1", "router"):
        a, b = _weights(f"{run_dir}/{folder}"), _weights(f"{tmp_path}/stream-False/{folder}")
        assert all(torch.equal(a[k], b[k]) for k in a), folder
