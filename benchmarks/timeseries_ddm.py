"""Benchmark: a monolith against a K-expert decentralized ensemble on time series (Sines, Stocks, Energy).

Both get the same total number of training steps (the monolith S steps, each of the K experts
S / K steps on its own cluster), the same network and the same sampler. Every routing strategy
(and the variants of `VARIANTS`: stochastic per step, switch times, router reuse, the likelihood
router) is sampled and scored with the metrics of ANCHORS.md (Context-FID, correlational,
discriminative, predictive, VDS, FDDS: mean +- 95% interval over repeats) and our roughness
diagnostic, with network evaluations per sample, the cluster coverage's total variation, and the
sampling wall time as a ratio to the monolith's in the same run. The router's accuracy and
calibration along t are reported per data set.

    python benchmarks/timeseries_ddm.py --datasets sines stocks energy --total-steps 8000 --out bench.json
    python benchmarks/timeseries_ddm.py --datasets sines --budgets 4000 16000 64000 --out sweep.json

Stocks and Energy are read from ../shared/data/timeseries/ (override with --stocks, --energy).
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
METRICS = ("context_fid", "correlational", "discriminative", "predictive", "vds", "fdds", "roughness")
# (label, request settings): the strategies of the DDM paper, then those of the routing issue.
VARIANTS = {
    "full": {"strategy": "full"},
    "topk (k=2)": {"strategy": "topk", "top_k": 2},
    "top1": {"strategy": "top1"},
    "sample": {"strategy": "sample"},
    "oracle": {"strategy": "oracle"},
    "stochastic": {"strategy": "stochastic"},
    "switch 0.25": {"strategy": "switch", "switch": 0.25},
    "switch 0.5": {"strategy": "switch", "switch": 0.5},
    "top1, router every 5": {"strategy": "top1", "router_every": 5},
    "stochastic, router every 5": {"strategy": "stochastic", "router_every": 5},
    "stochastic, likelihood router (4 draws)": {"strategy": "stochastic", "router": "likelihood",
                                                "likelihood_draws": 4},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sines", "stocks"], choices=["sines", "stocks", "energy"])
    parser.add_argument("--stocks", default=str(ROOT.parent / "shared" / "data" / "timeseries" / "stock_data.csv"))
    parser.add_argument("--energy", default=str(ROOT.parent / "shared" / "data" / "timeseries" / "energy_data.csv"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="LABEL",
                        help="the routing rows to sample (default: all)")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=list(METRICS))
    parser.add_argument("--sines", type=int, default=10_000, help="number of Sines windows")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--total-steps", type=int, default=8000, help="monolith steps = K x expert steps")
    parser.add_argument("--budgets", type=int, nargs="+", metavar="STEPS",
                        help="a budget sweep instead of --total-steps: the same runs trained on to each total in "
                             "turn (the learning rate is constant after warm-up, so this equals training each "
                             "budget afresh) and scored at each")
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


def score(run: sdk.Run, real: np.ndarray, label: str, settings: dict, args: argparse.Namespace,
          clusters: sdk.Run) -> dict:
    """One row: sample, then the metrics, the calls, and the coverage of `clusters`' partition."""
    start = time.perf_counter()
    out = run.sample(args.samples, solver=args.solver, steps=args.sampler_steps, seed=1, **settings)
    sample_s = time.perf_counter() - start
    fake = run.domain.scaled(out.batch)
    start = time.perf_counter()
    scores = {name: s.__dict__ for name, s in
              run.domain.evaluate_windows(real, fake, metrics=args.metrics, repeats=args.repeats,
                                          progress=False).items()}
    return {"strategy": label, "settings": settings, "expert_calls": out.expert_calls_per_sample,
            "router_calls": out.router_calls_per_sample, "sample_s": sample_s,
            "coverage_tv": clusters.coverage(out)["total_variation"], "metric_s": time.perf_counter() - start,
            "scores": scores}


def row(label: str, result: dict, metrics: list[str], monolith_s: float) -> str:
    cells = [f"{result['scores'][m]['mean']:.4f} ± {result['scores'][m]['interval']:.4f}" for m in metrics]
    calls = f"{result['expert_calls']:.0f} + {result['router_calls']:.0f}"
    return (f"| {label} | {calls} | {result['sample_s'] / monolith_s:.2f} | {result['coverage_tv']:.3f} | "
            + " | ".join(cells) + " |")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    sources = {"sines": f"sines:{args.sines}", "stocks": args.stocks, "energy": args.energy}
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}, CUDA {torch.cuda.is_available()}", "args": vars(args), "datasets": {}}
    budgets = sorted(args.budgets or [args.total_steps])
    for name, total in ((name, total) for name in args.datasets for total in budgets):
        runs = Path(args.runs) / (f"{name}-sweep" if args.budgets else f"{name}-{total}")
        mono, mono_s = fit(sources[name], runs / "monolith", 1, total, args)
        ddm, ddm_s = fit(sources[name], runs / f"ddm-{args.experts}", args.experts, total // args.experts, args)
        real = table_to_windows(mono.records()).astype(np.float64)
        entry = {"windows": len(real), "train_s": {"monolith": mono_s, "ddm": ddm_s},
                 "router_calibration": ddm.router_diagnostics().to_dict(orient="records"), "ddm": []}
        results["datasets"][f"{name}@{total}" if args.budgets else name] = entry
        print(f"\n{name}, {total} total steps: {len(real)} windows; train {mono_s:.0f} s (monolith) / {ddm_s:.0f} s "
              f"(DDM){' since the last budget' if args.budgets else ''}")
        print_calibration("router", entry["router_calibration"])
        print("| model | expert + router calls / sample | sampling time / monolith's | coverage TV | "
              + " | ".join(args.metrics) + " |")
        print("|---" * (len(args.metrics) + 4) + "|")
        entry["monolith"] = score(mono, real, "monolith", {"strategy": "top1"}, args, ddm)
        print(row("monolith", entry["monolith"], args.metrics, entry["monolith"]["sample_s"]), flush=True)
        for label in args.variants:  # each row printed and saved as it is done: a long run keeps what it measured
            entry["ddm"].append(score(ddm, real, label, VARIANTS[label], args, ddm))
            print(row(f"DDM K={args.experts}, {label}", entry["ddm"][-1], args.metrics, entry["monolith"]["sample_s"]),
                  flush=True)
            save(results, args.out)
        draws = next((VARIANTS[label]["likelihood_draws"] for label in args.variants
                      if "likelihood_draws" in VARIANTS[label]), None)
        if draws:  # the likelihood router's accuracy along t (fewer records than the router's: its cost)
            entry["likelihood_calibration"] = ddm.router_diagnostics(records=512, likelihood_draws=draws).to_dict(
                orient="records")
            print_calibration("likelihood router", entry["likelihood_calibration"])
        save(results, args.out)


def print_calibration(name: str, rows: list[dict]) -> None:
    print(f"{name}: " + ", ".join(f"t={r['t']:.2f} acc {r['accuracy']:.2f} ece {r['ece']:.3f}" for r in rows),
          flush=True)


def save(results: dict, out: str | None) -> None:
    if out:
        Path(out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
