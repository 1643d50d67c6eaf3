"""Benchmark: a monolith against a K-expert decentralized ensemble on graph generation (SPECTRE / DiGress).

Community-small, planar and SBM, generated with the published sizes and splits
(`archipelago.domains.graphs.synthetic`). Both models get the same total training steps (the
monolith S, each of the K experts S / K on its own cluster), the same network and the same sampler.
Every routing strategy is sampled (`--samples` graphs, `--repeats` seeds) and scored against the
test split with the metrics of ANCHORS.md: squared MMDs of degree, clustering, 4-node orbit counts
and spectra (Gaussian TV kernel, as SPECTRE and DiGress), GDSS's average of the first three with
its Gaussian EMD kernel, with the train-vs-test MMD of each beside them, and uniqueness, novelty,
validity and V.U.N. (planar: connected and planar; SBM: the block-model test). Network calls per
sample, the clusters' coverage and the sampling wall time as a ratio to the monolith's in the same
run are reported too.

    python benchmarks/graphs_ddm.py --datasets community-small planar --out graphs.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from archipelago.domains.graphs import metrics, synthetic
from archipelago.domains.graphs.domain import GraphDomain
from archipelago.domains.timeseries.metrics import Score
from archipelago.platform import sdk

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "full": {"strategy": "full"},
    "topk (k=2)": {"strategy": "topk", "top_k": 2},
    "top1": {"strategy": "top1"},
    "sample": {"strategy": "sample"},
    "oracle": {"strategy": "oracle"},
    "stochastic": {"strategy": "stochastic"},
    "switch 0.5": {"strategy": "switch", "switch": 0.5},
}
# Per data set: the domain settings and the published validity test.
DATASETS = {
    "community-small": {"max_nodes": 20, "require_connected": True},
    "planar": {"max_nodes": 64, "require_connected": True, "validity": "planar"},
    "sbm": {"max_nodes": 200, "validity": "sbm", "conditions": ["communities"]},  # up to 5 blocks of 40
}
COLUMNS = ("degree", "clustering", "orbit", "spectral", "gdss_average", "unique", "novel", "valid", "vun")


def all_metrics(reference: metrics.Descriptors, generated: list, train: list | None,
                validity: str | None) -> dict[str, float]:
    """The TV-kernel metrics (SPECTRE, DiGress) and GDSS's average of the degree, clustering and orbit
    MMDs with its Gaussian EMD kernel (`gdss_average`, the number ANCHORS.md quotes for GDSS), from
    the reference set's descriptors and the generated graphs described once for both kernels."""
    described = metrics.describe(generated)
    scores = {**metrics.mmds(reference, described), **metrics.sample_metrics(generated, train, validity)}
    emd = metrics.mmds(reference, described, kernel="emd")
    scores["gdss_average"] = float(np.mean([emd["degree"], emd["clustering"], emd["orbit"]]))
    return scores


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["community-small", "planar"], choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="LABEL")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--total-steps", type=int, nargs="+", default=[4000],
                        help="monolith steps = K x expert steps; one value, or one per data set")
    parser.add_argument("--router-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--samples", type=int, nargs="+", default=[100],
                        help="generated graphs per strategy and repeat; one value, or one per data set")
    parser.add_argument("--sampler-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "benchmarks"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on a shared 2-core machine more threads oversubscribe and run slower)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args()


def per_dataset(values: list[int], i: int) -> int:
    return values[i] if len(values) > 1 else values[0]


def fit(name: str, run_dir: Path, experts: int, steps: int, args: argparse.Namespace) -> tuple[sdk.Run, float]:
    domain = GraphDomain(width=args.width, depth=args.depth, **DATASETS[name])
    train = {"batch_size": args.batch_size, "lr": 5e-4, "warmup_steps": 100, "checkpoint_every": 1000,
             "progress": False}
    start = time.perf_counter()
    run = sdk.fit(name, str(run_dir), domain=domain, experts=experts, expert={**train, "steps": steps},
                  router={**train, "steps": args.router_steps if experts > 1 else 1}, seed=0)
    return run, time.perf_counter() - start


def score(run: sdk.Run, splits: dict, test: metrics.Descriptors, label: str, settings: dict, samples: int,
          args: argparse.Namespace, clusters: sdk.Run) -> dict:
    """One row: `repeats` sample sets, each scored; mean and 95% interval of every metric."""
    rows, seconds, calls, coverage = [], 0.0, (0.0, 0.0), []
    validity = run.domain.config.validity
    for repeat in range(args.repeats):
        start = time.perf_counter()
        out = run.sample(samples, solver="euler", steps=args.sampler_steps, seed=1 + repeat, **settings)
        seconds += time.perf_counter() - start
        calls = (out.expert_calls_per_sample, out.router_calls_per_sample)
        rows.append(all_metrics(test, out.items, splits["train"], validity))
        coverage.append(clusters.coverage(out)["total_variation"])
    scores = {key: Score.of([r[key] for r in rows]).__dict__ for key in rows[0]}
    return {"strategy": label, "settings": settings, "expert_calls": calls[0], "router_calls": calls[1],
            "sample_s": seconds / args.repeats, "coverage_tv": float(np.mean(coverage)), "scores": scores}


def row(label: str, result: dict, monolith_s: float) -> str:
    cells = [f"{result['scores'][m]['mean']:.4f} ± {result['scores'][m]['interval']:.4f}"
             if m in result["scores"] else "-" for m in COLUMNS]
    calls = f"{result['expert_calls']:.0f} + {result['router_calls']:.0f}"
    return (f"| {label} | {calls} | {result['sample_s'] / monolith_s:.2f} | {result['coverage_tv']:.3f} | "
            + " | ".join(cells) + " |")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}, CUDA {torch.cuda.is_available()}", "args": vars(args), "datasets": {}}
    for i, name in enumerate(args.datasets):
        steps, samples = per_dataset(args.total_steps, i), per_dataset(args.samples, i)
        splits = synthetic.benchmark(name)
        validity = DATASETS[name].get("validity")
        test = metrics.describe(splits["test"])  # once for every row
        reference = all_metrics(test, splits["train"], None, validity)  # novelty: not of train itself
        runs = Path(args.runs) / f"graphs-{name}-{steps}"
        mono, mono_s = fit(name, runs / "monolith", 1, steps, args)
        ddm, ddm_s = fit(name, runs / f"ddm-{args.experts}", args.experts, steps // args.experts, args)
        entry = {"graphs": {k: len(v) for k, v in splits.items()}, "train_s": {"monolith": mono_s, "ddm": ddm_s},
                 "total_steps": steps, "samples": samples, "train_vs_test": reference,
                 "parameters": sum(p.numel() for p in mono.domain.denoiser_network().parameters()),
                 "router_calibration": ddm.router_diagnostics(records=256).to_dict(orient="records"),
                 "monolith": score(mono, splits, test, "monolith", {"strategy": "top1"}, samples, args, ddm),
                 "ddm": [score(ddm, splits, test, label, VARIANTS[label], samples, args, ddm)
                         for label in args.variants]}
        results["datasets"][name] = entry
        print(f"\n{name}: {entry['graphs']} graphs; {steps} total steps; {entry['parameters']} parameters; "
              f"train {mono_s:.0f} s (monolith) / {ddm_s:.0f} s (DDM)")
        print("router: " + ", ".join(f"t={r['t']:.2f} acc {r['accuracy']:.2f} ece {r['ece']:.3f}"
                                     for r in entry["router_calibration"]))
        print("| model | expert + router calls / sample | sampling time / monolith's | coverage TV | "
              + " | ".join(COLUMNS) + " |")
        print("|---" * (len(COLUMNS) + 4) + "|")
        print("| train vs test | - | - | - | " + " | ".join(f"{reference[m]:.4f}" if m in reference else "-"
                                                          for m in COLUMNS) + " |")
        mono_sample_s = entry["monolith"]["sample_s"]
        print(row("monolith", entry["monolith"], mono_sample_s))
        for result in entry["ddm"]:
            print(row(f"DDM K={args.experts}, {result['strategy']}", result, mono_sample_s))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
