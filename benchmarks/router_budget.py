"""Benchmark: the router's accuracy and calibration along t against its training steps, for both
partitioners (capped k-means and the DDM paper's two-stage balanced k-means), with the balance of
the clusters each makes.

Only the partition and the router are trained (the router never sees the experts), one run
directory per (partitioner, router steps), so the rows are independent trainings from scratch.

    python benchmarks/router_budget.py --data ../shared/data/timeseries/stock_data.csv --experts 4 \
        --router-steps 200 600 1800 --out router_budget.json
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

from archipelago.platform import runner, steps
from archipelago.platform.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
SHOWN_TIMES = (0.05, 0.2, 0.5, 0.8, 1.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "timeseries" / "stock_data.csv"))
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["kmeans", "two_stage"], choices=["kmeans", "two_stage"])
    parser.add_argument("--router-steps", nargs="+", type=int, default=[200, 600, 1800])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--records", type=int, default=2048, help="records the diagnostics score")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "router-budget"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args()


def balance(sizes: list[int]) -> dict[str, float]:
    """Cluster balance: the largest over the smallest cluster, and the coefficient of variation."""
    array = np.asarray(sizes, dtype=np.float64)
    return {"max_over_min": float(array.max() / array.min()), "cv": float(array.std() / array.mean())}


def router_row(args: argparse.Namespace, method: str, router_steps: int) -> dict:
    train = {"batch_size": args.batch_size, "lr": 1e-3, "warmup_steps": 200, "progress": False}
    config = RunConfig(data=args.data, experts=args.experts, seed=0, partition={"method": method},
                       expert={**train, "steps": 1}, router={**train, "steps": router_steps})
    run_dir = runner.prepare(config, str(Path(args.runs) / f"{method}-{router_steps}"), runner.Launch(),
                             source=args.data)
    start = time.perf_counter()
    steps.train_router_step(run_dir)
    train_s = time.perf_counter() - start
    sizes = steps.read_summary(run_dir)["sizes"]
    return {"method": method, "router_steps": router_steps, "sizes": sizes, **balance(sizes), "train_s": train_s,
            "calibration": steps.router_diagnostics(run_dir, records=args.records)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}", "args": vars(args), "rows": []}
    print("| partitioner | cluster sizes | max/min | router steps | "
          + " | ".join(f"acc / ECE at t={t}" for t in SHOWN_TIMES) + " |")
    print("|---" * (4 + len(SHOWN_TIMES)) + "|")
    for method in args.methods:
        for router_steps in args.router_steps:
            row = router_row(args, method, router_steps)
            results["rows"].append(row)
            at = {round(r["t"], 2): r for r in row["calibration"]}
            cells = [f"{at[t]['accuracy']:.2f} / {at[t]['ece']:.3f}" for t in SHOWN_TIMES]
            print(f"| {method} | {row['sizes']} | {row['max_over_min']:.2f} | {router_steps} | "
                  + " | ".join(cells) + " |", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
