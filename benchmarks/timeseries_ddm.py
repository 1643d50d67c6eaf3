"""Benchmark: a monolith against a K-expert decentralized ensemble on time series (Sines, Stocks).

Both get the same total number of training steps (the monolith S steps, each of the K experts
S / K steps on its own cluster), the same network and the same sampler. Every routing strategy is
sampled and scored with the metrics of ANCHORS.md (Context-FID, correlational, discriminative,
predictive, VDS, FDDS: mean +- 95% interval over repeats), with network evaluations per sample.

    python benchmarks/timeseries_ddm.py --datasets sines stocks --total-steps 8000 --out bench.json

The Stocks file is read from ../shared/data/timeseries/stock_data.csv (override with --stocks).
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

from archipelago.domains.timeseries.data import table_to_windows
from archipelago.platform import sdk

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("full", "topk", "top1", "sample", "oracle")
METRICS = ("context_fid", "correlational", "discriminative", "predictive", "vds", "fdds")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sines", "stocks"], choices=["sines", "stocks"])
    parser.add_argument("--stocks", default=str(ROOT.parent / "shared" / "data" / "timeseries" / "stock_data.csv"))
    parser.add_argument("--sines", type=int, default=10_000, help="number of Sines windows")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--total-steps", type=int, default=8000, help="monolith steps = K x expert steps")
    parser.add_argument("--router-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2000, help="generated windows per strategy")
    parser.add_argument("--solver", default="heun")
    parser.add_argument("--sampler-steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "benchmarks"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on a shared 2-core machine more threads oversubscribe and run slower)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args()


def fit(source: str, run_dir: Path, experts: int, steps: int, args: argparse.Namespace) -> tuple[sdk.Run, float]:
    train = {"batch_size": args.batch_size, "lr": 1e-3, "warmup_steps": 200, "checkpoint_every": 1000,
             "progress": False}
    start = time.perf_counter()
    run = sdk.fit(source, str(run_dir), experts=experts, expert={**train, "steps": steps},
                  router={**train, "steps": args.router_steps if experts > 1 else 1}, seed=0)
    return run, time.perf_counter() - start


def score(run: sdk.Run, real: np.ndarray, strategy: str, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    out = run.sample(args.samples, strategy=strategy, solver=args.solver, steps=args.sampler_steps, seed=1)
    sample_s = time.perf_counter() - start
    fake = run.domain.scaled(out.batch)
    start = time.perf_counter()
    scores = {name: s.__dict__ for name, s in run.domain.evaluate_windows(real, fake, repeats=args.repeats).items()}
    return {"strategy": strategy, "expert_calls": out.expert_calls_per_sample,
            "router_calls": out.router_calls_per_sample, "sample_s": sample_s,
            "metric_s": time.perf_counter() - start, "scores": scores}


def row(label: str, result: dict) -> str:
    cells = [f"{result['scores'][m]['mean']:.4f} ± {result['scores'][m]['interval']:.4f}" for m in METRICS]
    calls = f"{result['expert_calls']:.0f} + {result['router_calls']:.0f}"
    return f"| {label} | {calls} | " + " | ".join(cells) + " |"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    sources = {"sines": f"sines:{args.sines}", "stocks": args.stocks}
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}, CUDA {torch.cuda.is_available()}", "args": vars(args), "datasets": {}}
    for name in args.datasets:
        runs = Path(args.runs) / f"{name}-{args.total_steps}"
        mono, mono_s = fit(sources[name], runs / "monolith", 1, args.total_steps, args)
        ddm, ddm_s = fit(sources[name], runs / f"ddm-{args.experts}", args.experts,
                         args.total_steps // args.experts, args)
        real = table_to_windows(mono.records()).astype(np.float64)
        entry = {"windows": len(real), "train_s": {"monolith": mono_s, "ddm": ddm_s},
                 "monolith": score(mono, real, "top1", args),
                 "ddm": [score(ddm, real, s, args) for s in STRATEGIES]}
        results["datasets"][name] = entry
        print(f"\n{name}: {len(real)} windows; train {mono_s:.0f} s (monolith) / {ddm_s:.0f} s (DDM)")
        print("| model | expert + router calls / sample | " + " | ".join(METRICS) + " |")
        print("|---" * (len(METRICS) + 2) + "|")
        print(row("monolith", entry["monolith"]))
        for result in entry["ddm"]:
            print(row(f"DDM K={args.experts}, {result['strategy']}", result))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
