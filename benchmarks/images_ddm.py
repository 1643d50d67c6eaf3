"""Benchmark: a monolith against a K-expert decentralized ensemble on images (the DDM paper's comparison).

Both models fit the same training images with the same total training steps (the monolith S, each of
the K experts S / K on its own cluster, so the same training FLOPs), the same diffusers denoiser and
the same sampler. For the monolith and every routing strategy of the ensemble:
- unconditional samples: FID against the first n test images, with the real-vs-real floor (the next
  n test images) and a noise ceiling measured the same way, precision and recall (k = 3);
- class-conditional samples (classes in turn), with guidance 1 and `--guidance`: the share the FID
  classifier assigns to the class asked for, and their FID;
- expert and router calls per sample, sampling wall time as a ratio to the monolith's in the same run,
  and a sample grid (PNG) per model.
FID features come from a classifier trained on the training images (ANCHORS.md: the practice the FID
authors recommend for MNIST), trained once, cached and named by its fingerprint in the results.

Profiles: `mnist` (the CPU benchmark of BENCHMARKS.md: MNIST IDX files, pixel space), `gpu` (CIFAR-10
sized: 32x32 RGB images read from `--train`/`--test` (any image source, e.g. CIFAR-10 as class
folders) or generated, a 6.8M-parameter UNet; sized to finish in under 10 minutes on one H100; without
a GPU it runs the `smoke` sizes instead, so its code is tested on a CPU, as the test suite does).
Training and scoring can run as separate processes (`--fit-only`).

    python benchmarks/images_ddm.py --fit-only monolith &   # and --fit-only ddm, in parallel
    python benchmarks/images_ddm.py --out images.json --grids benchmarks/results/images
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from archipelago.domains.images import data, io, metrics, writers
from archipelago.domains.images.domain import ImageDomain
from archipelago.platform import sdk, steps

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "images" / "mnist"
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"strategy": "full"},
    "topk (k=2)": {"strategy": "topk", "top_k": 2},
    "top1": {"strategy": "top1"},
    "sample": {"strategy": "sample"},
    "oracle": {"strategy": "oracle"},
    "stochastic": {"strategy": "stochastic"},
    "switch (0.5)": {"strategy": "switch", "switch": 0.5},
}
PROFILES: dict[str, dict[str, Any]] = {
    "mnist": {"train": str(MNIST / "train-images-idx3-ubyte.gz"), "test": str(MNIST / "t10k-images-idx3-ubyte.gz"),
              "preset": "tiny", "total_steps": 4000, "router_steps": 600, "batch_size": 64, "samples": 1000,
              "conditioned": 500, "sampler_steps": 25, "feature_net_steps": 1500},
    "gpu": {"train": None, "test": None, "preset": "base", "total_steps": 6000, "router_steps": 800,
            "batch_size": 128, "samples": 2000, "conditioned": 1000, "sampler_steps": 25, "feature_net_steps": 2000,
            "generated": 20000},
    "smoke": {"train": None, "test": None, "preset": "tiny", "total_steps": 16, "router_steps": 8, "batch_size": 8,
              "samples": 24, "conditioned": 20, "sampler_steps": 2, "feature_net_steps": 20, "generated": 160,
              "size": 16},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=list(PROFILES), default="mnist")
    parser.add_argument("--train", help="training images (any source the image domain reads)")
    parser.add_argument("--test", help="test images: the FID reference and the floor's real set")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--total-steps", type=int, help="monolith steps = K x expert steps")
    parser.add_argument("--router-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--preset", help="UNet preset (networks.UNET_PRESETS)")
    parser.add_argument("--samples", type=int, help="unconditional samples per model")
    parser.add_argument("--conditioned", type=int, help="class-conditional samples per model and guidance")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--sampler-steps", type=int)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="LABEL")
    parser.add_argument("--fit-only", choices=["monolith", "ddm"], default=None)
    parser.add_argument("--score", nargs="+", choices=["monolith", "ddm"], default=["monolith", "ddm"])
    parser.add_argument("--runs", default=str(ROOT / "runs" / "benchmarks"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--grids", default=None, help="write a sample grid per model here (PNG)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.profile == "gpu" and not torch.cuda.is_available():
        print("no GPU: the gpu profile runs at the smoke profile's sizes", flush=True)
        args.profile = "smoke"
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def synthetic_images(n: int, size: int, seed: int) -> io.Images:
    """CIFAR-10-sized stand-in data, made locally: 10 classes, each a shape (disc, square, bar) in a colour,
    at a random place and scale on a random dark background with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    colours = np.array([[1, .2, .2], [.2, 1, .2], [.2, .4, 1], [1, 1, .2], [1, .3, 1], [.2, 1, 1], [1, .6, .1],
                        [.7, .7, .7], [.6, .3, 1], [.5, 1, .4]])
    labels = rng.integers(0, 10, n)
    cx, cy, r = rng.uniform(.3, .7, n), rng.uniform(.3, .7, n), rng.uniform(.12, .28, n)
    pixels = np.empty((n, size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        dx, dy = np.abs(xx - cx[i]), np.abs(yy - cy[i])
        mask = [(dx**2 + dy**2) < r[i] ** 2, np.maximum(dx, dy) < r[i], (dx < r[i] / 3) & (dy < r[i])][label % 3]
        image = rng.uniform(0, .3, 3) + rng.normal(0, .03, (size, size, 3))
        image[mask] = colours[label] * rng.uniform(.7, 1.0)
        pixels[i] = np.clip(image * 255, 0, 255).astype(np.uint8)
    return io.Images(pixels=pixels, ids=[f"synthetic-{seed}-{i}" for i in range(n)], labels=[str(v) for v in labels])


def sources(args: argparse.Namespace) -> tuple[Any, Any]:
    """The training and test sources: the given ones, or generated stand-ins."""
    if args.train is not None:
        return args.train, args.test
    size = PROFILES[args.profile].get("size", 32)
    return synthetic_images(args.generated, size, 0), synthetic_images(max(2 * args.samples, 2 * args.conditioned),
                                                                      size, 1)


def fit(args: argparse.Namespace, experts: int, train: Any) -> tuple[sdk.Run, float]:
    domain = ImageDomain(preset=args.preset, feature_net_steps=args.feature_net_steps)
    settings = {"batch_size": args.batch_size, "lr": 1e-3, "warmup_steps": min(200, args.total_steps // 10),
                "checkpoint_every": 1000, "condition_dropout": 0.1, "progress": False}
    name = "monolith" if experts == 1 else f"ddm-{experts}"
    start = time.perf_counter()
    run = sdk.fit(train, str(Path(args.runs) / f"images-{args.profile}-{args.total_steps}" / name), domain=domain,
                  experts=experts, expert={**settings, "steps": args.total_steps // experts},
                  router={**settings, "steps": args.router_steps if experts > 1 else 1}, seed=0, wait=True)
    return run, time.perf_counter() - start


def timed_sample(run: sdk.Run, n: int, args: argparse.Namespace, **settings: Any) -> tuple[sdk.Samples, float]:
    start = time.perf_counter()
    out = run.sample(n, solver="euler", steps=args.sampler_steps, seed=1, batch_size=500, **settings)
    return out, time.perf_counter() - start


def scores_of(out: sdk.Samples, reference: np.ndarray, net: torch.nn.Module, report: dict,
              ddm: sdk.Run | None) -> dict:
    """The image metrics, and two views of mode coverage: the total variation between the classes the
    FID classifier sees in the samples and in the reference, and (with the ensemble's partition) between
    the samples' nearest clusters and the cluster sizes."""
    fake = data.from_unit(out.batch["image"].float())
    scores = metrics.image_metrics(reference, fake, net, report=report)
    scores["class_tv"] = 0.5 * float(np.abs(class_shares(net, fake) - class_shares(net, reference[:len(fake)])).sum())
    if ddm is not None:
        scores["cluster_tv"] = ddm.coverage(out)["total_variation"]
    return scores


def class_shares(net: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    """The share of images the classifier assigns to each class."""
    logits = metrics.class_logits(net, pixels)  # [N, classes]
    return np.bincount(logits.argmax(1).numpy(), minlength=logits.shape[1]) / len(pixels)


def conditioned(run: sdk.Run, settings: dict, test: io.Images, net: torch.nn.Module,
                args: argparse.Namespace) -> list[dict]:
    classes = run.domain.config.classes
    labels = [classes[i % len(classes)] for i in range(args.conditioned)]
    rows = []
    for guidance in (1.0, args.guidance):
        out, _ = timed_sample(run, args.conditioned, args, conditions={"label": labels}, guidance=guidance,
                              **settings)
        fake = data.from_unit(out.batch["image"].float())
        codes = np.array([i % len(classes) for i in range(args.conditioned)])
        rows.append({"guidance": guidance, "accuracy": metrics.class_accuracy(net, fake, codes),
                     "fid": metrics.fid(test.pixels[:len(fake)], fake, net)})
    return rows


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
            f"threads, {device}, torch {torch.__version__}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, test_source = sources(args)
    if args.fit_only:
        _, seconds = fit(args, 1 if args.fit_only == "monolith" else args.experts, train)
        print(f"{args.fit_only}: trained in {seconds:.0f} s", flush=True)
        return {}
    fits = {name: fit(args, 1 if name == "monolith" else args.experts, train) for name in args.score}
    runs = {name: run for name, (run, _) in fits.items()}  # near 0 s of training when --fit-only ran them
    first = next(iter(runs.values()))
    train_images = data.table_to_images(first.records())
    test = data.table_to_images(first.domain.ingest(test_source, fit=False))
    classes = first.domain.config.classes
    start = time.perf_counter()
    net, report = metrics.cached_feature_net(train_images.pixels, np.array([classes.index(v) for v in
                                                                             train_images.labels]),
                                             len(classes), Path(args.runs) / "feature-nets",
                                             steps=args.feature_net_steps)
    results: dict[str, Any] = {
        "machine": machine(), "args": vars(args), "train_images": len(train_images.ids), "test_images": len(test.ids),
        "train_s": {name: seconds for name, (_, seconds) in fits.items()},
        "feature_net": {**report, "s": time.perf_counter() - start},
        "parameters": sum(p.numel() for p in first.domain.denoiser_network().parameters()),
        "cluster_sizes": steps.read_summary(runs["ddm"].run_dir)["sizes"] if "ddm" in runs else None,
        "test_accuracy": metrics.class_accuracy(net, test.pixels, np.array([classes.index(v) for v in test.labels])),
        "router": runs["ddm"].router_diagnostics(records=2000).to_dict("records") if "ddm" in runs else None,
    }
    models = [("monolith", runs["monolith"], {"strategy": "top1"})] if "monolith" in runs else []
    if "ddm" in runs:
        models += [(f"DDM K={args.experts}, {label}", runs["ddm"], VARIANTS[label]) for label in args.variants]
    for label, run, settings in models:
        out, seconds = timed_sample(run, args.samples, args, **settings)
        entry = {"settings": settings, "expert_calls": out.expert_calls_per_sample,
                 "router_calls": out.router_calls_per_sample, "sample_s": seconds,
                 "scores": scores_of(out, test.pixels, net, report, runs.get("ddm")),
                 "conditioned": conditioned(run, settings, test, net, args)}
        results.setdefault("models", {})[label] = entry
        if args.grids:
            grid = writers.grid(data.from_unit(out.batch["image"][:64].float()), columns=8)
            Path(args.grids).mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^a-z0-9.]+", "-", label.split(",")[-1].strip().lower()).strip("-")
            grid.save(Path(args.grids) / f"{args.profile}-{name}.png")
        print(label, json.dumps({k: v for k, v in entry.items() if k != "settings"}, default=float), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2, default=float))
    print_table(results)
    return results


def print_table(results: dict) -> None:
    first = next(iter(results["models"].values()))
    mono_s = results["models"].get("monolith", first)["sample_s"]
    print("| model | expert + router calls / sample | time / monolith's | FID | floor | ceiling | precision | recall | "
          "accuracy w=1 | accuracy w=g | FID w=1 | FID w=g |")
    print("|---" * 13 + "|")
    for label, e in results["models"].items():
        s, (c1, cg) = e["scores"], e["conditioned"]
        print(f"| {label} | {e['expert_calls']:.0f} + {e['router_calls']:.0f} | {e['sample_s'] / mono_s:.2f} | "
              f"{s['fid']:.2f} | {s['fid_floor']:.2f} | {s['fid_ceiling']:.0f} | {s['precision']:.3f} | "
              f"{s['recall']:.3f} | {c1['accuracy']:.3f} | {cg['accuracy']:.3f} | {c1['fid']:.2f} | {cg['fid']:.2f} |")


if __name__ == "__main__":
    main()
