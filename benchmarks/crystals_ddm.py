"""Benchmark: a monolith against a K-expert decentralized ensemble on crystals (CDVAE / DiffCSP, Perov-5).

Both models fit the same training file with the same total training steps (the monolith S, each of
the K experts S / K on its own cluster), the same CSPNet-style network and the same sampler. Three
tasks, scored with the definitions of ANCHORS.md against the test file:
- de novo generation, `--samples` crystals per routing strategy: structure and SMACT validity,
  COV-R / COV-P (CrystalNN and Magpie fingerprints), EMD of density and of the number of elements,
  and the share of crystals that round-trip through CIF (written, read back, matched to themselves);
- structure prediction, one sample per test composition (the first `--prediction` of them): match
  rate and RMSE with StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3), and how many of those
  compositions also occur in the training file;
- property-conditioned generation: `--property` at three targets (the 10th, 50th and 90th percentile
  of the training values), with guidance 1 and `--guidance`; the property of the samples measured by
  a regressor fitted on the training file (its own held-out error reported beside it).
Network calls per sample and the sampling wall time as a ratio to the monolith's in the same run are
reported too. Training and scoring can run as separate processes (`--fit-only monolith|ddm`), since
a fit that has finished resumes as a no-op.

    python benchmarks/crystals_ddm.py --fit-only monolith &   # and --fit-only ddm, in parallel
    python benchmarks/crystals_ddm.py --out crystals.json
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

from archipelago.domains.crystals import data, metrics, writers
from archipelago.domains.crystals.domain import CrystalDomain
from archipelago.platform import sdk

ROOT = Path(__file__).resolve().parents[1]
PEROV = ROOT.parent / "shared" / "data" / "crystals" / "perov_5"
VARIANTS = {
    "full": {"strategy": "full"},
    "topk (k=2)": {"strategy": "topk", "top_k": 2},
    "top1": {"strategy": "top1"},
    "sample": {"strategy": "sample"},
}
GENERATION = ("valid_structure", "valid_composition", "cov_recall", "cov_precision", "emd_density", "emd_elements")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", default=str(PEROV / "val.csv"), help="the training file (CDVAE CSV)")
    parser.add_argument("--test", default=str(PEROV / "test.csv"))
    parser.add_argument("--dataset", default="perov_5", help="its coverage cutoffs (ANCHORS.md)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--total-steps", type=int, default=12000, help="monolith steps = K x expert steps")
    parser.add_argument("--router-steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--coordinate-weight", type=float, default=12.0, help="the coordinates' loss weight")
    parser.add_argument("--samples", type=int, default=1000, help="de novo crystals per strategy")
    parser.add_argument("--prediction", type=int, default=1000, help="test compositions for structure prediction")
    parser.add_argument("--property", default="heat_ref")
    parser.add_argument("--property-samples", type=int, default=200, help="per target and guidance")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--sampler-steps", type=int, default=100)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="LABEL")
    parser.add_argument("--fit-only", choices=["monolith", "ddm"], default=None)
    parser.add_argument("--score", nargs="+", choices=["monolith", "ddm"], default=["monolith", "ddm"],
                        help="the models to score (two processes can score one each)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "benchmarks"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--workers", type=int, default=None, help="processes for fingerprints and matching")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args()


def fit(args: argparse.Namespace, experts: int) -> tuple[sdk.Run, float]:
    domain = CrystalDomain(conditions=[args.property], width=args.width, depth=args.depth, coverage=args.dataset,
                           coordinate_weight=args.coordinate_weight)
    train = {"batch_size": args.batch_size, "lr": 5e-4, "warmup_steps": 200, "checkpoint_every": 1000,
             "condition_dropout": 0.3, "progress": False}
    name = "monolith" if experts == 1 else f"ddm-{experts}"
    start = time.perf_counter()
    run = sdk.fit(args.train, str(Path(args.runs) / f"crystals-{args.total_steps}" / name), domain=domain,
                  experts=experts, expert={**train, "steps": args.total_steps // experts},
                  router={**train, "steps": args.router_steps if experts > 1 else 1}, seed=0, wait=True)
    return run, time.perf_counter() - start


def timed_sample(run: sdk.Run, n: int, args: argparse.Namespace, **settings) -> tuple[sdk.Samples, float]:
    start = time.perf_counter()
    out = run.sample(n, solver="euler", steps=args.sampler_steps, seed=1, **settings)
    return out, time.perf_counter() - start


def generation(run: sdk.Run, settings: dict, test: list, test_fps: metrics.Fingerprints,
               args: argparse.Namespace) -> dict:
    out, seconds = timed_sample(run, args.samples, args, **settings)
    scores = metrics.generation_metrics(out.items, test, dataset=args.dataset, n_valid=args.samples,
                                        reference_fps=test_fps, workers=args.workers, progress=False)
    scores["cif_round_trip"] = float(np.mean([writers.round_trips(s) for s in out.items]))
    return {"settings": settings, "expert_calls": out.expert_calls_per_sample,
            "router_calls": out.router_calls_per_sample, "sample_s": seconds, "scores": scores}


def prediction(run: sdk.Run, settings: dict, truth: list, args: argparse.Namespace) -> dict:
    species = [[str(site.specie) for site in s] for s in truth]
    out, seconds = timed_sample(run, len(truth), args, given={"atom_type": species}, **settings)
    scores = metrics.match_rate_rmse(out.items, truth, workers=args.workers, progress=False)
    return {"settings": settings, "sample_s": seconds, "scores": scores}


def conditioned(run: sdk.Run, settings: dict, targets: list[float], regressor: metrics.PropertyRegressor,
                args: argparse.Namespace) -> list[dict]:
    rows = []
    for target in targets:
        for guidance in (1.0, args.guidance):
            out, _ = timed_sample(run, args.property_samples, args, conditions={args.property: target},
                                  guidance=guidance, **settings)
            rows.append({"target": target, "guidance": guidance,
                         **metrics.property_metrics(out.items, np.full(len(out.items), target), regressor)})
    out, _ = timed_sample(run, args.property_samples, args, **settings)  # unconditioned, for reference
    rows.append({"target": None, "guidance": None,
                 **metrics.property_metrics(out.items, np.full(len(out.items), np.nan), regressor)})
    return rows


def overlap(train: list, test: list) -> float:
    """The share of test compositions (reduced formulas) that also occur in training."""
    seen = {s.composition.reduced_formula for s in train}
    return float(np.mean([s.composition.reduced_formula in seen for s in test]))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.fit_only:
        _, seconds = fit(args, 1 if args.fit_only == "monolith" else args.experts)
        print(f"{args.fit_only}: trained in {seconds:.0f} s", flush=True)
        return
    (mono, mono_s), (ddm, ddm_s) = fit(args, 1), fit(args, args.experts)  # near 0 s when --fit-only ran them
    train_table = mono.records()
    train = data.table_to_structures(train_table)
    test = data.table_to_structures(mono.domain.ingest(args.test, fit=False))
    cache = Path(args.runs) / "fingerprints"
    test_fps = metrics.cached_fingerprints(test, cache, workers=args.workers)
    truth = test[: args.prediction]
    values = np.array([np.nan if v is None else v for v in train_table.column(args.property).to_pylist()])
    known = ~np.isnan(values)
    train_fps = metrics.cached_fingerprints(train, cache, workers=args.workers)
    regressor = metrics.PropertyRegressor.fit(train, values, workers=args.workers, fps=train_fps)  # NaN values: unused
    targets = [float(np.percentile(values[known], q)) for q in (10, 50, 90)]
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}, CUDA {torch.cuda.is_available()}", "args": vars(args),
               "train_crystals": len(train), "test_crystals": len(test), "train_s": {"monolith": mono_s, "ddm": ddm_s},
               "parameters": sum(p.numel() for p in mono.domain.denoiser_network().parameters()),
               "train_vs_test": metrics.generation_metrics(train, test, dataset=args.dataset, n_valid=args.samples,
                                                           reference_fps=test_fps, generated_fps=train_fps,
                                                           workers=args.workers, progress=False),
               "prediction_overlap": overlap(train, truth), "regressor": regressor.report(), "targets": targets}
    models = [("monolith", mono, {"strategy": "top1"})] * ("monolith" in args.score) + [
        (f"DDM K={args.experts}, {label}", ddm, VARIANTS[label]) for label in args.variants] * ("ddm" in args.score)
    for label, run, settings in models:
        entry = results.setdefault("models", {}).setdefault(label, {})
        entry["generation"] = generation(run, settings, test, test_fps, args)
        entry["prediction"] = prediction(run, settings, truth, args)
        if label == "monolith" or settings["strategy"] in ("top1", "full"):
            entry["property"] = conditioned(run, settings, targets, regressor, args)
        print(label, json.dumps({k: v.get("scores", v) if isinstance(v, dict) else v for k, v in entry.items()}),
              flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2, default=float))
    print_tables(results)


def print_tables(results: dict) -> None:
    first = next(iter(results["models"].values()))
    mono_s = results["models"].get("monolith", first)["generation"]["sample_s"]
    print("| model | expert + router calls / sample | sampling time / monolith's | "
          + " | ".join(GENERATION) + " | match rate | RMSE |")
    print("|---" * (len(GENERATION) + 5) + "|")
    for label, entry in results["models"].items():
        g, p = entry["generation"], entry["prediction"]["scores"]
        cells = [f"{100 * g['scores'][m]:.2f}" if not m.startswith("emd") else f"{g['scores'][m]:.4f}"
                 for m in GENERATION]
        print(f"| {label} | {g['expert_calls']:.0f} + {g['router_calls']:.0f} | {g['sample_s'] / mono_s:.2f} | "
              + " | ".join(cells) + f" | {100 * p['match_rate']:.2f} | {p['rmse']:.4f} |")


if __name__ == "__main__":
    main()
