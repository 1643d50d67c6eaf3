"""Benchmark: islands as separate Ray clusters against islands of one cluster, and the cost of losing one.

1. The same fit (K = 2 time-series experts, `--steps` each) submitted two ways on this machine:
   - one cluster of two nodes (islands "a" and "b", a head and a worker): `archipelago submit`;
   - two clusters of one node each: `archipelago submit --island a` and `--island b` to their own
     heads at once, then `archipelago assemble` (which trains the router) in a fresh process.
   Reported: the wall time from submission to an assembled ensemble, cluster start-up excluded
   (clusters are started first), and its ratio, separate / one, in the same invocation.
2. An island killed mid-training (`--fault-repeats` times): the scenario of
   tests/test_separate_clusters.py (a one-node island cluster SIGKILLed halfway between two
   checkpoints; its expert resumed on a replacement cluster), run through pytest with
   ARCHIPELAGO_FAULT_FIGURES set: steps lost per failure, time to bring a replacement up, time from
   resubmission to the resumed training and to done.

    python benchmarks/separate_clusters.py --out separate_clusters.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.cluster: the local clusters of the test suite

from tests.cluster import LocalCluster, one_node_cluster, two_node_cluster  # noqa: E402

ARCHIPELAGO = str(Path(sys.executable).with_name("archipelago"))
DOMAIN = {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1}


def settings_file(folder: Path, steps: int) -> Path:
    train = {"steps": steps, "batch_size": 16, "warmup_steps": 10, "checkpoint_every": 500, "progress": False}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(folder / "run"), "data": "sines:400", "experts": 2, "domain_config": DOMAIN,
        "expert": train, "router": {**train, "steps": max(steps // 10, 10)},
        "placement": [{"island": "a", "num_cpus": 1}, {"island": "b", "num_cpus": 1}],
        "router_placement": {"num_cpus": 0},
    }))
    return path


def archipelago(*args: str) -> None:
    done = subprocess.run([ARCHIPELAGO, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"archipelago {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")


def submit_and_wait(settings: Path, cluster: LocalCluster, *island: str) -> None:
    archipelago("submit", str(settings), "--address", cluster.dashboard_url, "--no-tracking", "--working-dir",
                str(settings.parent), "--wait", "--timeout", "1800", *island)


def one_cluster(folder: Path, steps: int) -> float:
    with two_node_cluster(folder / "cluster") as cluster:
        settings = settings_file(folder, steps)
        start = time.monotonic()
        submit_and_wait(settings, cluster)
        return time.monotonic() - start


def separate_clusters(folder: Path, steps: int) -> float:
    with ExitStack() as stack:
        clusters = {island: stack.enter_context(one_node_cluster(folder / "clusters", island)) for island in "ab"}
        settings = settings_file(folder, steps)
        start = time.monotonic()
        jobs = [subprocess.Popen([ARCHIPELAGO, "submit", str(settings), "--island", island, "--address",
                                  cluster.dashboard_url, "--no-tracking", "--working-dir", str(folder), "--wait",
                                  "--timeout", "1800"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for island, cluster in clusters.items()]
        for job in jobs:
            if job.wait() != 0:
                raise RuntimeError(f"an island's submission failed:\n{job.stderr.read()[-3000:]}")
        archipelago("assemble", "--run-dir", str(folder / "run"))
        return time.monotonic() - start


def fault_figures(repeats: int) -> list[dict]:
    figures = []
    for _ in range(repeats):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            env = {**os.environ, "ARCHIPELAGO_FAULT_FIGURES": out.name}
            test = [sys.executable, "-m", "pytest", "-q", "tests/test_separate_clusters.py", "-k", "killed"]
            done = subprocess.run(test, cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the fault scenario failed:\n{done.stdout[-3000:]}")
            figures.append(json.loads(Path(out.name).read_text()))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="steps of each expert (default 2000)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of each layout (default 2)")
    parser.add_argument("--fault-repeats", type=int, default=3, help="repeats of the fault scenario (default 3)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"one cluster": [], "separate clusters": []}
    for _ in range(args.repeats):  # alternated, so that a noisy neighbour hits both layouts
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            times["one cluster"].append(round(one_cluster(Path(a), args.steps), 1))
            times["separate clusters"].append(round(separate_clusters(Path(b), args.steps), 1))
    ratios = [round(s / o, 2) for s, o in zip(times["separate clusters"], times["one cluster"], strict=True)]
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "steps_per_expert": args.steps, "wall_s": times, "ratio_separate_over_one": ratios,
              "faults": fault_figures(args.fault_repeats)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
