"""Per-cluster statistics: templates are drawn after the expert is chosen, from that expert's counts,
and the codec's latent stage round-trips through the run directory."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from archipelago.platform import sdk
from tests.toy_graphs import LatentVectorDomain, ToyGraphDomain, plane_vectors, toy_graphs

TINY = {"steps": 15, "batch_size": 16, "warmup_steps": 2, "progress": False}


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    return sdk.fit(toy_graphs(120), str(tmp_path_factory.mktemp("graphs") / "run"), domain=ToyGraphDomain(),
                   experts=2, expert=TINY, router=TINY)


def test_oracle_sizes_follow_each_experts_partition(graph_run):
    out = graph_run.sample(400, strategy="oracle", steps=3, seed=0)
    statistics = graph_run.ensemble.statistics
    assert statistics[0]["nodes"] != statistics[1]["nodes"]  # the partition split graphs by size
    sizes = torch.bincount(out.batch["node_batch"], minlength=400)
    for k, stats in enumerate(statistics):
        counts = np.array(stats["nodes"])
        observed = np.bincount(sizes[out.assignment == k].numpy(), minlength=len(counts))
        assert observed[counts == 0].sum() == 0  # no size the partition never had
        support = counts > 0
        expected = counts[support] / counts.sum() * observed.sum()
        assert chisquare(observed[support], expected).pvalue > 0.01


def test_per_step_strategies_draw_sizes_from_the_merged_statistics(graph_run):
    out = graph_run.sample(300, strategy="top1", steps=3, seed=1)
    merged = np.sum([np.pad(s["nodes"], (0, 8 - len(s["nodes"]))) for s in graph_run.ensemble.statistics], 0)
    observed = np.bincount(torch.bincount(out.batch["node_batch"]).numpy(), minlength=len(merged))
    support = merged > 0
    assert chisquare(observed[support], merged[support] / merged.sum() * 300).pvalue > 0.01


def test_a_codec_run_stores_latents_and_decodes_samples(tmp_path):
    run = sdk.fit(plane_vectors(100), str(tmp_path / "run"), domain=LatentVectorDomain(), experts=2, expert=TINY,
                  router=TINY, codec=TINY)
    assert (tmp_path / "run" / "latents.json").exists()
    assert (tmp_path / "run" / "latents" / "expert=0" / "part-0.parquet").exists()
    out = run.sample(5, strategy="top1", steps=4)
    assert out.items.shape == (5, 4)  # decoded back from 2-d latents to the records' 4-d vectors
