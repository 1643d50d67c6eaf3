"""Benchmark: one expert on one worker against the same expert on two workers of one island (DDP).

The same expert of a time-series run (Sines, the default network unless told otherwise) trains for
a fixed number of steps of a fixed global batch through `archipelago.platform.data_parallel` (Ray
Train's TorchTrainer), once with `placement.workers` = 1 and once with 2, on an embedded Ray whose
one node is labelled island a (one CPU and one torch thread per worker). Reported: samples per
second of the training loop, global batch x steps / the loop's wall time (the training's own
`wall_time` metric, so Ray, worker start-up and data loading are left out), and the ratio
2 workers / 1 worker, measured in the same invocation; with --repeats the settings alternate and
the medians are reported. Prints one JSON object.

    python benchmarks/data_parallel.py --steps 300 --batch-size 128
    python benchmarks/data_parallel.py --smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from archipelago.platform import data_parallel, steps
from archipelago.platform.config import RunConfig

ISLAND = "a"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch, split over the workers")
    parser.add_argument("--windows", type=int, default=4000, help="Sines windows in the run")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a tiny size that only checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.windows, args.width, args.depth = 4, 16, 200, 16, 1
    return args


def make_run(root: Path, name: str, workers: int, args: argparse.Namespace) -> str:
    """A partitioned run whose expert 0 trains on `workers` workers of the island."""
    config = RunConfig(data=f"sines:{args.windows}", experts=2,
                       domain_config={"width": args.width, "depth": args.depth},
                       expert={"steps": args.steps, "batch_size": args.batch_size, "checkpoint_every": args.steps,
                               "log_every": args.steps, "progress": False, "device": "cpu"},
                       placement=[{"island": ISLAND, "workers": workers}, {"island": ISLAND}])
    run_dir = str(root / name)
    steps.prepare(config, run_dir)
    return run_dir


def lead(run_dir: str) -> dict[str, Any]:
    """Rank 0: train expert 0 and keep the training's last logged metrics (its loop's wall time)."""
    logged: list[dict[str, float]] = []
    result = steps.train_expert_step(run_dir, 0, on_log=lambda step, metrics: logged.append(metrics), island=ISLAND)
    return {"loop_s": logged[-1]["wall_time"], "steps": result.steps, "final_loss": result.final_loss}


def measure(root: Path, name: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = make_run(root, name, workers, args)
    start = time.perf_counter()
    out = data_parallel.train_expert(run_dir, 0, ISLAND, functools.partial(lead, run_dir))
    end_to_end = time.perf_counter() - start
    return {"samples_per_s": args.steps * args.batch_size / out["loop_s"], "loop_s": out["loop_s"],
            "end_to_end_s": end_to_end, "final_loss": out["final_loss"]}


def main() -> None:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="archipelago-dp-bench-"))
    # One node labelled island a, with a CPU per worker; the dashboard is not needed.
    ray.init(address="local", num_cpus=args.workers, labels={"island": ISLAND}, include_dashboard=False)
    runs: dict[int, list[dict[str, Any]]] = {1: [], args.workers: []}
    try:
        for repeat in range(args.repeats):
            for workers in runs:
                runs[workers].append(measure(root, f"w{workers}-{repeat}", workers, args))
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    rate = {workers: statistics.median(r["samples_per_s"] for r in rows) for workers, rows in runs.items()}
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "ray": ray.__version__, "load_average": os.getloadavg()},
        "settings": vars(args),
        "runs": {f"{workers} worker(s)": rows for workers, rows in runs.items()},
        "samples_per_s": {f"{workers} worker(s)": round(value, 1) for workers, value in rate.items()},
        "ratio": round(rate[args.workers] / rate[1], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
