"""Benchmark: which expert each trajectory runs on, step by step, under each routing strategy.

Samples a fitted K-expert run with per-sample routing traces (`Generated.trace`) and reports, per
strategy: the share of trajectories on each expert at the first and at the last network call
against the clusters' shares of the data, the mean number of expert switches per trajectory, and
the coverage total variation of the samples. It measures what top-1 routing does in the first steps,
where the router's posterior is close to its prior.

    python benchmarks/routing_traces.py --run-dir runs/benchmarks/sines-sweep/ddm-4
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from archipelago.platform import sdk


def shares(experts: np.ndarray, k: int) -> list[float]:
    return (np.bincount(experts, minlength=k) / len(experts)).round(3).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a fitted, assembled K-expert run")
    parser.add_argument("--strategies", nargs="+", default=["top1", "stochastic", "sample", "full"])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sampler-steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = sdk.Run(args.run_dir)
    for strategy in args.strategies:
        out = run.sample(args.samples, strategy=strategy, solver="heun", steps=args.sampler_steps, seed=1)
        trace, coverage = out.trace.numpy(), run.coverage(out)
        k = len(coverage["expected"])
        row = {"strategy": strategy, "calls": trace.shape[1], "data_shares": np.round(coverage["expected"], 3).tolist(),
               "first_call_shares": shares(trace[:, 0], k), "last_call_shares": shares(trace[:, -1], k),
               "switches_per_trajectory": round(float((trace[:, 1:] != trace[:, :-1]).sum(1).mean()), 2),
               "coverage_tv": round(coverage["total_variation"], 3)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
