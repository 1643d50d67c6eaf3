"""Benchmark: an ensemble against its distilled students (dense, and few-step by reflow): time series, graphs.

Distils a fitted K-expert run (copies of it, so the source stays as it was) and scores the
ensemble's strategies at 20 Heun steps, the dense student at the same solver, and the reflow
student at 1, 2 and 4 Euler steps with the metrics of ANCHORS.md, network calls per sample and
sampling wall time as a ratio to the first strategy's in the same repeat. Each repeat is a whole
distillation with its own seed (students' weights and batches, and the pairs), its own sample seed
and its own metric seed; rows give the mean and 95% interval over the repeats. The pairs come
from the full mixture (a deterministic coupling; discrete fields by their reveal noise) unless
told otherwise. The distillation's compute is reported as a share of the experts' training
compute, counted in network passes over one sample (a training step costs about 3 passes per
sample: forward and backward; the router is counted as one expert pass, which overstates it).

    python benchmarks/distill_ddm.py --run-dir runs/sines4k/sines-4000/ddm-4 --out distill.json
    python benchmarks/distill_ddm.py --run-dir runs/graphs/community-small-4000/ddm-4 \
        --real community-small:test --samples 100 --sampler-steps 100

Graphs are scored against `--real` (novelty against the run's own records); their masked path is
integrated with Euler steps, and `--sampler-steps` replaces the ensemble's and dense student's 20.
Repeats run apart (`--seeds 2` in another process) are joined into one table with

    python benchmarks/distill_ddm.py --merge seeds-0-1.json seed-2.json --out distill.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from archipelago.domains.graphs import metrics as graph_metrics
from archipelago.domains.graphs.data import table_to_graphs
from archipelago.domains.timeseries.data import table_to_windows
from archipelago.domains.timeseries.metrics import Score
from archipelago.platform import sdk

METRICS = ("context_fid", "correlational", "discriminative", "predictive", "vds", "fdds", "roughness")
GRAPH_METRICS = ("degree", "clustering", "orbit", "spectral", "unique", "novel", "valid", "vun")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a fitted, assembled K-expert run")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="join the repeats of earlier outputs instead")
    parser.add_argument("--work", default=None, help="where the distilled copy goes (default: <run-dir>-distilled)")
    parser.add_argument("--strategies", nargs="+", default=["sample", "full"],
                        help="the ensemble's rows at 20 Heun steps (the first is the time ratios' baseline)")
    parser.add_argument("--teacher-strategy", default="full",
                        help="the pairs' strategy (full: a deterministic coupling, the dense student's mixture)")
    parser.add_argument("--dense-steps", type=int, default=1000)
    parser.add_argument("--reflow-steps", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one repeat per seed: a distillation, a sample set and a metric run of its own")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=list(METRICS))
    parser.add_argument("--real", default=None, help="graphs: the reference set, a source the domain reads")
    parser.add_argument("--sampler-steps", type=int, default=20, help="the ensemble's and dense student's steps")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if (args.run_dir is None) == (args.merge is None):
        parser.error("give either --run-dir (distil and score) or --merge (join earlier outputs)")
    return args


def distil(args: argparse.Namespace, solver: dict, seed: int) -> tuple[sdk.Run, float]:
    work = Path(args.work or f"{args.run_dir.rstrip('/')}-distilled") / f"seed-{seed}"
    if not work.exists():
        shutil.copytree(args.run_dir, work, ignore=shutil.ignore_patterns("students"))
    train = {"batch_size": args.batch_size, "lr": 1e-3, "warmup_steps": 200, "checkpoint_every": 1000,
             "progress": False}
    start = time.perf_counter()
    run = sdk.load(str(work)).distill(dense={**train, "steps": args.dense_steps},
                                      reflow={**train, "steps": args.reflow_steps}, pairs=args.pairs,
                                      teacher={"strategy": args.teacher_strategy, **solver}, seed=seed)
    return run, time.perf_counter() - start


def compute_share(run: sdk.Run, args: argparse.Namespace, teacher_calls: float) -> dict[str, float]:
    """Network passes over one sample: the distillation's against the experts' training."""
    k = len(run.ensemble.experts)
    experts = k * run.config.expert.steps * run.config.expert.batch_size * 3
    dense = args.dense_steps * args.batch_size * (3 + k + 1)  # student forward/backward + the full mixture
    pairs = args.pairs * teacher_calls
    reflow = args.reflow_steps * args.batch_size * 3
    return {"experts": experts, "dense": dense, "pairs": pairs, "reflow": reflow,
            "share": (dense + pairs + reflow) / experts}


def score(run: sdk.Run, real: Any, label: str, settings: dict, args: argparse.Namespace, repeat: int) -> dict:
    """One repeat of one row: a sample set (seed 1 + repeat) and its metrics (metric seed `repeat`)."""
    start = time.perf_counter()
    out = run.sample(args.samples, seed=1 + repeat, **settings)
    sample_s = time.perf_counter() - start
    if run.domain.name == "graphs":
        values = {**graph_metrics.mmds(real["test"], graph_metrics.describe(out.items)),
                  **graph_metrics.sample_metrics(out.items, real["train"], run.domain.config.validity)}
    else:
        scores = run.domain.evaluate_windows(real, run.domain.scaled(out.batch), metrics=args.metrics, repeats=1,
                                             seed=repeat, progress=False)
        values = {name: s.mean for name, s in scores.items()}
    return {"model": label, "settings": settings, "calls": out.expert_calls_per_sample + out.router_calls_per_sample,
            "sample_s": sample_s, "values": values}


def combine(repeats: list[list[dict]]) -> list[dict]:
    """Rows over the repeats: mean calls, mean time ratio to the repeat's first row, and every
    metric's mean and 95% interval."""
    rows = []
    for same in zip(*repeats, strict=True):
        ratios = [r["sample_s"] / first[0]["sample_s"] for r, first in zip(same, repeats, strict=True)]
        rows.append({"model": same[0]["model"], "settings": same[0]["settings"],
                     "calls": float(np.mean([r["calls"] for r in same])), "time_ratio": float(np.mean(ratios)),
                     "scores": {m: Score.of([r["values"][m] for r in same]).__dict__ for m in same[0]["values"]}})
    return rows


def reference(run: sdk.Run, args: argparse.Namespace) -> Any:
    """What samples are scored against: the run's windows, or a graph reference set and the training graphs."""
    if run.domain.name != "graphs":
        return table_to_windows(run.records()).astype(np.float64)
    if args.real is None:
        raise SystemExit("graphs need --real, the reference set (for example community-small:test)")
    args.metrics = [m for m in GRAPH_METRICS if run.domain.config.validity or m not in ("valid", "vun")]
    test = table_to_graphs(run.domain.ingest(args.real, fit=False))
    return {"test": graph_metrics.describe(test), "train": table_to_graphs(run.records())}  # test described once


def repeat(args: argparse.Namespace, solver: dict, seed: int, real: Any) -> tuple[list[dict], float, float]:
    """One repeat: distil with `seed`, then every row scored against `real` (sample and metric seeds
    follow `seed`, so repeats run apart stay distinct); its rows, the distillation's seconds and the
    teacher's calls."""
    run, distill_s = distil(args, solver, seed)
    rows = [score(run, real, f"ensemble, {strategy}", {"strategy": strategy, **solver}, args, seed)
            for strategy in args.strategies]
    teacher_calls = next((r["calls"] for r in rows if r["settings"]["strategy"] == args.teacher_strategy), None)
    if teacher_calls is None:
        teacher_calls = score(run, real, "teacher", {"strategy": args.teacher_strategy, **solver}, args, seed)["calls"]
    rows.append(score(run, real, "dense student", {"model": "dense", **solver}, args, seed))
    rows += [score(run, real, f"reflow student, {n} Euler step{'s' * (n > 1)}",
                   {"model": "student", "solver": "euler", "steps": n}, args, seed) for n in (1, 2, 4)]
    print(f"repeat with seed {seed}: distillation {distill_s:.0f} s", flush=True)
    return rows, distill_s, teacher_calls


def merge(paths: list[str]) -> dict:
    """One result from outputs whose repeats ran apart: their repeats and distillation times joined.
    Refused when the outputs were made with other budgets, or share a seed."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    budget = ("run_dir", "dense_steps", "reflow_steps", "pairs", "batch_size", "samples", "sampler_steps",
              "strategies", "teacher_strategy", "metrics", "real")
    for path, part in zip(paths[1:], parts[1:], strict=True):
        differ = [key for key in budget if part["args"][key] != parts[0]["args"][key]]
        if differ:
            raise SystemExit(f"{path} was made with other settings than {paths[0]}: {', '.join(differ)}")
    repeats = [rows for part in parts for rows in part["repeats"]]
    seeds = [seed for part in parts for seed in part["args"]["seeds"][:len(part["repeats"])]]
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"the outputs repeat a seed ({seeds}): a repeat counted twice is not a repeat")
    return {**parts[0], "args": {**parts[0]["args"], "seeds": seeds, "merged": paths},
            "distill_s": [s for part in parts for s in part["distill_s"]], "rows": combine(repeats),
            "repeats": repeats}


def report(results: dict) -> None:
    rows = results["rows"]
    metrics = list(rows[0]["scores"])
    print(f"distillation: {np.mean(results['distill_s']):.0f} s a repeat; compute "
          f"{results['compute']['share']:.2f} of the experts' training")
    print("| model | calls / sample | time / ensemble's | " + " | ".join(metrics) + " |")
    print("|---" * (len(metrics) + 3) + "|")
    for row in rows:
        cells = [f"{row['scores'][m]['mean']:.4f} ± {row['scores'][m]['interval']:.4f}" for m in metrics]
        print(f"| {row['model']} | {row['calls']:.0f} | {row['time_ratio']:.2f} | " + " | ".join(cells) + " |")


def distil_and_score(args: argparse.Namespace) -> dict:
    """Every repeat of `args.seeds`, saved to `args.out` after each."""
    source = sdk.load(args.run_dir)
    graphs = source.domain.name == "graphs"  # a masked path: Euler steps
    solver = {"solver": "euler" if graphs else "heun", "steps": args.sampler_steps}
    real = reference(source, args)  # once, and before any distillation (graphs without --real fail here)
    repeats, seconds = [], []
    for seed in args.seeds:
        rows, distill_s, teacher_calls = repeat(args, solver, seed, real)
        repeats.append(rows)
        seconds.append(distill_s)
        results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                              f"{torch.__version__}", "args": vars(args), "distill_s": seconds,
                   "compute": compute_share(source, args, teacher_calls), "rows": combine(repeats),
                   "repeats": repeats}
        if args.out:  # saved after every repeat
            Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.merge:
        results = merge(args.merge)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    else:
        results = distil_and_score(args)
    report(results)


if __name__ == "__main__":
    main()
