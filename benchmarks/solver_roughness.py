"""Benchmark: the residual noise of samples against the solver and its steps (the roughness diagnostic).

Samples one fitted time-series run with each (solver, steps) and reports roughness (the samples'
mean step-to-step change over the data's; 1 is the data) and the sampling wall time.

    python benchmarks/solver_roughness.py --run-dir runs/benchmarks/stocks-4000/monolith --samples 500
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from archipelago.domains.timeseries.data import table_to_windows
from archipelago.domains.timeseries.metrics import roughness
from archipelago.platform import sdk

GRID = (("heun", 20), ("heun", 100), ("euler", 40), ("euler", 200), ("rk4", 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--strategy", default="top1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = sdk.load(args.run_dir)
    real = table_to_windows(run.records()).astype(np.float64)
    print("| solver | steps | model calls | roughness | sampling s |\n|---|---|---|---|---|")
    for solver, steps in GRID:
        start = time.perf_counter()
        out = run.sample(args.samples, solver=solver, steps=steps, seed=1, strategy=args.strategy)
        elapsed = time.perf_counter() - start
        score = roughness(real, run.domain.scaled(out.batch)).mean
        print(f"| {solver} | {steps} | {out.expert_calls_per_sample:.0f} | {score:.2f} | {elapsed:.1f} |", flush=True)


if __name__ == "__main__":
    main()
