"""Benchmark: what the time-series anchors do against residual noise, on one model at small budgets.

Trains one model (K = 1) on a time-series data set per (prediction, Fourier weight, steps), samples
it with Heun, and reports the domain metrics with roughness (the samples' mean step-to-step change
over the data's; 1 is the data). The objectives compared are ours (velocity), Diffusion-TS's x_0
prediction, and x_0 prediction with Diffusion-TS's Fourier-domain loss term (weight sqrt(L) / 5, as
Diffusion-TS sets it), at an expert's budget and at the monolith's.

    python benchmarks/expert_objective.py --data ../shared/data/timeseries/stock_data.csv --steps 1000 4000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from archipelago.domains.timeseries.data import table_to_windows
from archipelago.platform import sdk

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 24
OBJECTIVES = {  # label: (prediction, Fourier weight)
    "velocity": ("velocity", 0.0),
    "x0": ("x0", 0.0),
    "x0 + Fourier": ("x0", math.sqrt(WINDOW) / 5),
}
METRICS = ["context_fid", "correlational", "discriminative", "vds", "fdds", "roughness"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "timeseries" / "stock_data.csv"))
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sampler-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "benchmarks" / "objective"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args()


def fit(args: argparse.Namespace, label: str, steps: int) -> tuple[sdk.Run, float]:
    prediction, weight = OBJECTIVES[label]
    train = {"batch_size": 64, "lr": 1e-3, "warmup_steps": 200, "checkpoint_every": 1000, "progress": False}
    run_dir = Path(args.runs) / f"{label.replace(' + ', '-').replace(' ', '-')}-{steps}"
    start = time.perf_counter()
    run = sdk.fit(args.data, str(run_dir), experts=1, expert={**train, "steps": steps}, router={**train, "steps": 1},
                  prediction=prediction, domain_config={"window": WINDOW, "fourier_weight": weight}, seed=0)
    return run, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}", "args": vars(args), "rows": []}
    print("| objective | steps | train s | " + " | ".join(METRICS) + " |")
    print("|---" * (len(METRICS) + 3) + "|")
    for steps in args.steps:
        for label in args.objectives:
            run, train_s = fit(args, label, steps)
            real = table_to_windows(run.records()).astype(np.float64)
            out = run.sample(args.samples, solver="heun", steps=args.sampler_steps, seed=1)
            scores = run.domain.evaluate_windows(real, run.domain.scaled(out.batch), metrics=METRICS,
                                                 repeats=args.repeats, progress=False)
            results["rows"].append({"objective": label, "steps": steps, "train_s": train_s,
                                    "scores": {name: s.__dict__ for name, s in scores.items()}})
            cells = [f"{scores[m].mean:.4f} ± {scores[m].interval:.4f}" for m in METRICS]
            print(f"| {label} | {steps} | {train_s:.0f} | " + " | ".join(cells) + " |", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
