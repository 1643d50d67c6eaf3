"""Benchmark: experts as modules on a planted partition (Sines plus one family of square waves).

The data are Sines windows plus a family of square waves (`--squares` of them, about a fifth),
which balanced k-means puts in a cluster of their own. Measured:

- forget: the square waves' share of generated samples before and after `remove-expert` of the
  planted expert, by a classifier trained on real windows (logistic regression on the partition
  features, square vs sine) and by the saved centroids; the other clusters' shares; time-series
  metrics of the generated sines against the real sines, before and after;
- grow: a run fitted on the Sines alone, then `add-data` of the square waves as a new partition:
  their share of generated samples, and whether the untouched experts' files are byte-identical;
- attribute: the confusion matrix of each sample's main expert (its attribution) against the
  cluster its window is nearest to.

    python benchmarks/modules_planted.py --expert-steps 1500 --out modules.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from archipelago.domains.timeseries.data import sines, window_features
from archipelago.platform import sdk
from archipelago.router.partition import Partition

METRICS = ("correlational", "vds", "fdds", "discriminative")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sines", type=int, default=2000)
    parser.add_argument("--squares", type=int, default=500)
    parser.add_argument("--experts", type=int, default=5, help="K of the run with the planted family")
    parser.add_argument("--expert-steps", type=int, default=1500)
    parser.add_argument("--router-steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--strategy", default="sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--square-range", nargs=2, type=float, default=[0.5, 1.0], metavar=("LOW", "HIGH"),
                        help="the square waves' value range (default that of the Sines, [0.5, 1])")
    parser.add_argument("--phases", nargs="+", default=["forget", "grow"], choices=["forget", "grow"])
    parser.add_argument("--out", default="modules_planted.json")
    return parser.parse_args()


def square_waves(n: int, bottom: float, top: float, length: int = 24, channels: int = 5, seed: int = 1
                 ) -> np.ndarray:
    """Square waves in [bottom, top]: per channel a random period (4..12 steps), phase, and a low
    level in the lower 30% and a high one in the upper 30% of the range."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)[None, :, None]
    period = rng.uniform(4, 12, size=(n, 1, channels))
    phase = rng.uniform(0, 1, size=(n, 1, channels))
    span = top - bottom
    low = bottom + span * rng.uniform(0.0, 0.3, size=(n, 1, channels))
    high = bottom + span * rng.uniform(0.7, 1.0, size=(n, 1, channels))
    up = ((t / period + phase) % 1.0) < 0.5
    return np.where(up, high, low).astype(np.float64)


def fit(data: np.ndarray, run_dir: Path, experts: int, args: argparse.Namespace) -> sdk.Run:
    train = {"steps": args.expert_steps, "progress": False}
    return sdk.fit(data, str(run_dir), experts=experts, expert=train,
                   router={"steps": args.router_steps, "progress": False})


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def centroids(run_dir: Path) -> Partition:
    summary = json.loads((run_dir / "partition.json").read_text())
    return Partition(np.zeros(0, int), np.asarray(summary["centroids"]), np.asarray(summary["mean"]),
                     np.asarray(summary["scale"]))


def measure(run: sdk.Run, classifier: LogisticRegression, args: argparse.Namespace, real_sines: np.ndarray,
            all_clusters: Partition) -> dict:
    """Square share, cluster shares, attribution confusion and sine metrics of one ensemble's samples."""
    start = time.perf_counter()
    out = run.sample(args.samples, strategy=args.strategy, steps=20, seed=0)
    seconds = time.perf_counter() - start
    windows = run.domain.scaled(out.batch)  # the run's scaled space, where its partition and metrics live
    features = window_features(windows)
    square = classifier.predict(window_features(run.domain.decode(out.batch))).astype(bool)  # raw units
    nearest = all_clusters.assign(features)
    k = len(all_clusters.centroids)
    frame = run.attribute(out, nearest=0)
    confusion = np.zeros((k, k), int)
    np.add.at(confusion, (nearest, frame["expert"].to_numpy()), 1)
    scores = {} if (~square).sum() < 2 else run.domain.evaluate_windows(
        run.domain.scaler.transform(real_sines), windows[~square], metrics=list(METRICS), repeats=args.repeats,
        progress=False)
    return {"square_share": float(square.mean()), "cluster_shares": (np.bincount(nearest, minlength=k)
                                                                     / len(nearest)).round(4).tolist(),
            "attribution_confusion": confusion.tolist(), "sampling_s": round(seconds, 2),
            "sine_metrics": {name: {"mean": s.mean, "interval": s.interval} for name, s in scores.items()}}


def forget(data: np.ndarray, squares: np.ndarray, real_sines: np.ndarray, classifier: LogisticRegression,
           work: Path, args: argparse.Namespace) -> dict:
    """Fit on Sines + squares, measure, remove the planted expert, measure again."""
    planted_dir = work / "planted"
    shutil.rmtree(planted_dir, ignore_errors=True)
    clock = time.perf_counter()
    run = fit(data, planted_dir, args.experts, args)
    result = {"fit_s": round(time.perf_counter() - clock, 1)}
    all_clusters = centroids(planted_dir)
    nearest = all_clusters.assign(window_features(run.domain.scaler.transform(squares)))
    planted = int(np.bincount(nearest).argmax())
    result["planted"] = {"expert": planted, "squares_in_its_cluster": float((nearest == planted).mean()),
                         "cluster_sizes": json.loads((planted_dir / "partition.json").read_text())["sizes"]}
    result["before_removal"] = measure(run, classifier, args, real_sines, all_clusters)
    clock = time.perf_counter()
    removed = run.remove_expert(planted)
    result["remove_s"] = round(time.perf_counter() - clock, 1)
    result["after_removal"] = measure(removed, classifier, args, real_sines, all_clusters)
    return result


def grow(real_sines: np.ndarray, squares: np.ndarray, classifier: LogisticRegression, work: Path,
         args: argparse.Namespace) -> dict:
    """Fit on the Sines alone, measure, add the squares as a new partition, measure again."""
    grown_dir = work / "grown"
    shutil.rmtree(grown_dir, ignore_errors=True)
    base = fit(real_sines, grown_dir, args.experts - 1, args)
    before = files(grown_dir / "experts")
    clock = time.perf_counter()
    grown = base.add_data(squares, new_partitions=1)
    result = {"add_s": round(time.perf_counter() - clock, 1)}
    after = files(grown_dir / "experts")
    new = f"expert-{args.experts - 1}/"
    result["untouched_experts_identical"] = {k: v for k, v in after.items() if not k.startswith(new)} == before
    clusters = centroids(grown_dir)
    result["before"] = measure(sdk.load(str(grown_dir), version=1), classifier, args, real_sines, clusters)
    result["after"] = measure(grown, classifier, args, real_sines, clusters)
    return result


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    work = Path(args.work or tempfile.mkdtemp(prefix="modules-"))
    real_sines, squares = sines(args.sines, length=24), square_waves(args.squares, *args.square_range)
    data = np.concatenate([real_sines, squares])
    classifier = LogisticRegression(max_iter=2000).fit(
        window_features(data), np.r_[np.zeros(len(real_sines)), np.ones(len(squares))])
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "settings": vars(args), "data": {"sines": args.sines, "squares": args.squares,
                                               "square_share": args.squares / len(data)},
              "square_range": args.square_range}
    if "forget" in args.phases:
        result.update(forget(data, squares, real_sines, classifier, work, args))
    if "grow" in args.phases:
        result["grow"] = grow(real_sines, squares, classifier, work, args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
