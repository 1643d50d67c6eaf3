"""Benchmark: how much of the teacher's map from noise to sample a few-step student of discrete fields learned.

A distilled run's pairs hold, for every discrete field, the reveal noise the teacher sampled from
and the teacher's sample. The reflow student, run from that same noise, should reproduce the
sample; this reports the share of discrete entries where it does, at a few Euler step counts, and
the same with the noise shuffled across entries (what a student that ignores the noise, or reads
only each entry's own marginal, reaches), on the first `--pairs` pairs.

    python benchmarks/student_agreement.py runs/graphs/community-small-4000/ddm-4-distilled/seed-0
"""

from __future__ import annotations

import argparse

import torch

from archipelago.experts import storage
from archipelago.experts.batch import reveal_key
from archipelago.experts.distill import pair_starts
from archipelago.experts.solvers import integrate
from archipelago.platform import distill, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a distilled run")
    parser.add_argument("--pairs", type=int, default=256, help="pairs to compare on (the first ones)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 20])
    args = parser.parse_args()
    torch.set_num_threads(1)
    summary = storage.read_json(storage.join(args.run_dir, distill.STUDENTS, distill.STUDENTS_FILE))
    config, domain = distill.DistillConfig(**summary["config"]), steps.load_domain(args.run_dir)
    pairs = distill.read_pairs(args.run_dir, config, domain, summary["ensemble_version"])
    batch = pairs.batch(torch.arange(min(args.pairs, len(pairs))))
    student = distill.load_student(args.run_dir, "student").experts[0]
    discrete = sorted(name for name, spec in domain.fields.items() if spec.path.stochastic_steps)
    if not discrete:
        raise SystemExit(f"{args.run_dir}: the {domain.name} domain has no discrete fields")
    x_1 = pair_starts(batch, domain.fields)
    shuffled = dict(x_1)
    g = torch.Generator().manual_seed(0)
    for name in discrete:
        shuffled[reveal_key(name)] = x_1[reveal_key(name)][torch.randperm(len(batch[name]), generator=g)]
    heads = [f"{n} Euler step" + "s" * (n > 1) for n in args.steps]
    print("| noise | " + " | ".join(heads) + " |")
    print("|---" * (len(args.steps) + 1) + "|")
    for label, start in (("the teacher's", x_1), ("shuffled", shuffled)):
        cells = []
        for n in args.steps:
            out = integrate(student, start, domain.fields, "euler", n)
            agree = [float((out[name] == batch[name]).float().mean()) for name in discrete]
            cells.append(" / ".join(f"{a:.3f}" for a in agree))
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
