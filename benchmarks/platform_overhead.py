"""Benchmark: the platform's overhead and the throughput of islands, on the time-series domain.

1. One expert trained through the platform (a Ray task on island a, reading its partition from the
   run directory, tracked as an MLflow child run) against the same `train_expert` called directly
   in this process on the same partition. Both use one CPU thread (Ray gives a 1-CPU task one
   thread). Reported: samples per second end to end (from submitting to the result) and inside the
   training loop (the `samples_per_s` metrics), and the overhead as 1 - platform / direct.
2. Two experts on two islands at once against one expert alone: aggregate samples per second.

A real two-node cluster (one CPU per node) is started on this machine, as in the tests, and
stopped by PID at the end. Runs alternate direct / platform to spread the machine's noise.

    python benchmarks/platform_overhead.py --steps 600 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.cluster, the two-node launcher the tests use

from archipelago.experts.training import ExpertConfig, derive_seed, train_expert  # noqa: E402
from archipelago.platform import islands, steps, tracking  # noqa: E402
from archipelago.platform.config import RunConfig  # noqa: E402
from archipelago.platform.tasks import TrackingTarget, train_expert_task  # noqa: E402
from tests.cluster import two_node_cluster  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--windows", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def template_run(root: Path, args: argparse.Namespace) -> Path:
    config = RunConfig(data=f"sines:{args.windows}", experts=2,
                       expert={"steps": args.steps, "batch_size": args.batch_size, "checkpoint_every": args.steps,
                               "log_every": 50, "progress": False})
    run_dir = root / "template"
    steps.prepare(config, str(run_dir))
    return run_dir


def fresh(template: Path, root: Path, name: str) -> str:
    target = root / name
    shutil.copytree(template, target)
    return str(target)


def direct(template: Path, root: Path, name: str, args: argparse.Namespace) -> dict:
    run_dir = fresh(template, root, name)
    config, domain = steps.load_config(run_dir), steps.load_domain(run_dir)
    samples = domain.samples(steps.expert_records(run_dir, 0))
    expert = ExpertConfig(partition=0, train=config.expert.model_copy(update={"seed": derive_seed(0, "expert", 0)}))
    logged = []
    torch.set_num_threads(1)
    start = time.perf_counter()
    train_expert(expert, domain, samples, steps.expert_dir(run_dir, 0), on_log=lambda s, m: logged.append(m))
    wall = time.perf_counter() - start
    return {"end_to_end": args.steps * args.batch_size / wall, "in_loop": _in_loop(logged)}


def _in_loop(logged: list[dict]) -> float:
    rates = [m["samples_per_s"] for m in logged[1:]] or [m["samples_per_s"] for m in logged]
    return statistics.median(rates)


def on_islands(template: Path, root: Path, name: str, placements: list[str], uri: str, args) -> dict:
    run_dir = fresh(template, root, name)
    parent = tracking.start_parent(uri, "benchmark", {}, run_dir)
    target = TrackingTarget(uri, parent)
    specs = [islands.TaskSpec(train_expert_task, (run_dir, k, target), name=f"expert-{k}", island=island,
                              env_vars={tracking.TRACKING_ENV: uri}) for k, island in enumerate(placements)]
    start = time.perf_counter()
    results = islands.submit_tasks(specs)
    wall = time.perf_counter() - start
    tracking.finish_run(uri, parent)
    client = mlflow.MlflowClient(uri)
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    in_loop = [statistics.median([m.value for m in client.get_metric_history(c.info.run_id, "samples_per_s")][1:])
               for c in children]
    assert [r["island"] for r in results] == placements
    return {"end_to_end": len(placements) * args.steps * args.batch_size / wall, "in_loop": sum(in_loop)}


def main() -> None:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="archipelago-bench-"))
    uri = f"sqlite:///{root}/mlflow.db"
    template = template_run(root, args)
    rows: dict[str, list[dict]] = {"direct": [], "platform": [], "one island": [], "two islands": []}
    (root / "cluster").mkdir()
    with two_node_cluster(root / "cluster") as cluster:
        islands.connect(cluster.address)
        for i in range(args.repeats):
            rows["direct"].append(direct(template, root, f"direct-{i}", args))
            rows["platform"].append(on_islands(template, root, f"platform-{i}", ["a"], uri, args))
            rows["two islands"].append(on_islands(template, root, f"two-{i}", ["a", "b"], uri, args))
        rows["one island"] = rows["platform"]
        islands.disconnect()
    median = {name: {key: statistics.median(r[key] for r in runs) for key in ("end_to_end", "in_loop")}
              for name, runs in rows.items()}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {args.steps} steps x batch "
          f"{args.batch_size}, {args.repeats} repeats (medians)")
    print("| setting | samples/s end to end | samples/s in the training loop |")
    print("|---|---|---|")
    for name, m in median.items():
        print(f"| {name} | {m['end_to_end']:.0f} | {m['in_loop']:.0f} |")
    for key in ("end_to_end", "in_loop"):
        overhead = 1 - median["platform"][key] / median["direct"][key]
        scaling = median["two islands"][key] / median["one island"][key]
        print(f"{key}: platform overhead {overhead:+.1%}; two islands / one island = {scaling:.2f}x")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
