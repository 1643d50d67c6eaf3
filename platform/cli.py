"""The command line, `archipelago`: a whole fit from a YAML file, each step on its own, sampling,
evaluation, progress read from storage, and submission to a Ray cluster.

    archipelago fit run.yaml                          # Ray embedded, MLflow in ./mlflow.db
    archipelago fit run.yaml --address 10.0.0.1:6379 --tracking-uri http://mlflow:5000
    archipelago status --run-dir runs/sines           # while a fit runs anywhere
    archipelago sample --run-dir runs/sines -n 1000 --strategy sample --out samples.npy
    archipelago evaluate --run-dir runs/sines --samples samples.npy --metrics correlational
    archipelago submit run.yaml --address http://10.0.0.1:8265 --wait
    archipelago submit run.yaml --island a --address http://island-a:8265   # islands as separate clusters,
    archipelago submit run.yaml --island b --address http://island-b:8265   # sharing only the run's storage,
    archipelago assemble --run-dir s3://bucket/runs/sines                    # then the router and the ensemble
    archipelago add-data --run-dir runs/sines --data new.csv --new-partitions 1   # a new expert
    archipelago remove-expert --run-dir runs/sines --expert 2                     # forget a partition
    archipelago diagnose --run-dir runs/sines                                     # the router along t

The settings file and its overrides are described in `archipelago.platform.cli_config`. Every
command takes --help and --dry-run (prints the resolved settings and the plan, writes nothing).
The step commands (partition, train-expert, train-router, assemble) run one step in this process
from the run directory, so each can run on any machine that sees the storage. The commands that
write a run take its lease (`archipelago.experts.lease`): a second writer fails naming the holder,
or waits with --wait.

Exit codes: 0 success; 2 the command line or the settings are wrong (one line naming the key or
the file; nothing ran); 1 the run could not start or failed (one line: an unreachable Ray address
or tracking server, an island with no node, an unwritable or conflicting run directory, bad data,
a failed task, a job that did not succeed, experts not done at `assemble`). `archipelago --debug ...`
raises with the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from archipelago.experts.lease import LeaseHeld
from archipelago.platform import (
    cli_config,
    credentials,
    island_runs,
    jobs,
    modules,
    runner,
    sample_files,
    sdk,
    steps,
    tasks,
    tracking,
)
from archipelago.platform import distill as dist
from archipelago.platform.cli_config import ConfigError, Settings
from archipelago.platform.islands import MissingIslandError, TaskFailedError, use_token_auth
from archipelago.platform.status import run_status, status_text

PROG = "archipelago"
RUNTIME_ERRORS = (OSError, ValueError, ArithmeticError, MissingIslandError, TaskFailedError, LeaseHeld,
                  island_runs.ExpertsNotDone)  # exit 1


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2. No abbreviated flags: `--n 3` must not
    silently mean `--nearest 3`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- the commands ---------------------------------------------------------------------------------


def fit(args: argparse.Namespace) -> int:
    s = cli_config.settings_from_args(args, absolute=True)
    _check_island_flags(args)
    if args.dry_run:
        return _print_plan(s, args.island, args.expert)
    if args.wait:
        s = dataclasses.replace(s, launch=dataclasses.replace(s.launch, wait=True))
    if args.island:
        return _fit_island(args, s)
    result = runner.fit(s.config, s.run_dir, domain=s.domain, launch=s.launch)
    _print_tasks(result)
    if result.parent_run_id:
        print(f"mlflow run: {result.parent_run_id}\nmodel: {result.model_uri}")
    print(f"run directory: {result.run_dir}\nnext: {PROG} sample --run-dir {result.run_dir} -n 16 --out samples.npy")
    return 0


def _fit_island(args: argparse.Namespace, s: Settings) -> int:
    result = island_runs.fit_island(s.config, s.run_dir, args.island, s.launch, args.expert, domain=s.domain)
    _print_tasks(result)
    if result.parent_run_id:
        print(f"mlflow run: {result.parent_run_id}")
    print(f"island {args.island}: experts {[task['name'] for task in result.tasks]} done in {result.run_dir}\nnext, "
          f"once every island is done: {PROG} assemble --run-dir {result.run_dir} (see {PROG} status)")
    return 0


def _print_tasks(result: runner.FitResult) -> None:
    for task in result.tasks:
        print(
            f"{task['name']}: {task['steps']} steps (resumed from {task['resumed_from']}), final loss "
            f"{task['final_loss']:.4f}, node {task['node_id']}, island {task['island']}"
        )


def partition(args: argparse.Namespace) -> int:
    """With settings: fit's first step (check everything, ingest and partition, then write the run
    directory). With only --run-dir: partition a run directory that holds records (done: a no-op)."""
    prepare = args.config or args.config_json or args.data
    if not prepare and not args.run_dir:
        raise ConfigError("partition needs a settings file (or --data) or the --run-dir of a prepared run")
    s = cli_config.settings_from_args(args, absolute=True) if prepare else None
    run_dir = s.run_dir if s else args.run_dir
    if args.dry_run:
        if s:
            print(cli_config.to_yaml(s), end="")
        print(f"# plan\ncheck, ingest and partition into {run_dir}" if s else f"# plan\npartition {run_dir}")
        return 0
    with steps.run_lease(run_dir, "archipelago partition", args.wait):
        if s:
            runner.prepare(s.config, s.run_dir, runner.Launch(ray=False, track=False), domain=s.domain)
        summary = steps.partition(run_dir)
        steps.encode(run_dir)
    for k in summary.get("rebuilt", []):
        print(f"rebuilt the missing partition data/expert={k} of {run_dir} from its records")
    print(f"partitioned {run_dir}: cluster sizes {summary['sizes']}")
    return 0


def train_expert(args: argparse.Namespace) -> int:
    config = steps.load_config(args.run_dir)
    if not 0 <= args.expert < config.experts:
        raise ConfigError(f"--expert {args.expert}: the run has experts 0..{config.experts - 1}")
    folder = steps.expert_dir(args.run_dir, args.expert)
    if args.dry_run:
        return _print_step_plan(args, f"train expert {args.expert} for {config.expert.steps} steps into {folder}")
    _print_report(tasks.train_expert_task(args.run_dir, args.expert, _target(args), wait=args.wait))
    return 0


def train_router(args: argparse.Namespace) -> int:
    config = steps.load_config(args.run_dir)
    folder = steps.router_dir(args.run_dir)
    if args.dry_run:
        return _print_step_plan(args, f"train the router for {config.router.steps} steps into {folder}")
    _print_report(tasks.train_router_task(args.run_dir, _target(args), wait=args.wait))
    return 0


def assemble(args: argparse.Namespace) -> int:
    config = steps.load_config(args.run_dir)
    if args.dry_run:
        return _print_step_plan(args, f"check that every expert is done, train the router unless it is, and write "
                                      f"{steps.ENSEMBLE_FILE} in {args.run_dir} from the latest checkpoints")
    target = _target(args)
    island_runs.check_experts_done(args.run_dir)  # before a parent run is made for nothing
    if target is None and args.tracking_uri:  # islands tracked apart: the assembly gets a parent run of its own
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.check_tracking(uri)
        parent = tracking.start_parent(uri, args.experiment, config.model_dump(mode="json"), args.run_dir, "assemble")
        with tracking.finishing(uri, parent):
            return _assemble(args, tasks.TrackingTarget(uri, parent))
    return _assemble(args, target)


def _assemble(args: argparse.Namespace, target: tasks.TrackingTarget | None) -> int:
    router = island_runs.assemble_run(args.run_dir, target, args.wait)
    if router:
        _print_report(router)
    print(f"assembled {args.run_dir}")
    if target:
        print(f"mlflow run: {target.parent_id}\nmodel: "
              f"{tracking.log_ensemble_model(target.uri, target.parent_id, args.run_dir, args.register)}")
    return 0


def sample(args: argparse.Namespace) -> int:
    try:
        sample_files.check_suffix(args.out)
    except ValueError as error:
        raise ConfigError(f"--out {error}") from error
    request = cli_config.request_from_args(args)
    run = sdk.load(args.run_dir, args.version)
    request = run.request(request)  # checked against the run before any sampling work
    sample_files.check_target(args.out, run.domain)
    if args.dry_run:
        print(f"# plan\nsample from {args.run_dir} with {request.model_dump_json(exclude={'given'})}; write {args.out}")
        return 0
    out = run.sample(request)
    # Which partitions made each sample: the ensemble's routing says; a student's samples have no experts.
    frame = run.attribute(out, args.nearest) if request.model == "ensemble" else None  # before anything is written
    sample_files.write(args.out, out, run.domain)
    what = {"ensemble": request.strategy.value, "student": "the few-step student", "dense": "the dense student"}[
        request.model]
    attribution = f"; attribution in {sample_files.write_attribution(args.out, frame)}" if frame is not None else ""
    print(
        f"wrote {request.n} samples to {args.out} ({what}, {request.solver}, {request.steps} steps); "
        f"evaluations per sample: {out.expert_calls_per_sample:g} expert, {out.router_calls_per_sample:g} router"
        f"{attribution}"
    )
    return 0


def add_data(args: argparse.Namespace) -> int:
    config = steps.load_config(args.run_dir)
    how = f"into {args.new_partitions} new partitions" if args.new_partitions else "into the nearest clusters"
    if args.dry_run:
        return _print_module_plan(args, f"add the records of {args.data} to {args.run_dir} {how}; train the experts "
                                      f"that change and a new router; assemble a new version ({config.experts} "
                                      f"experts at the fit)")
    version = modules.add_data(args.run_dir, args.data, args.new_partitions, args.extra_steps, _module_launch(args))
    print(f"added {args.data} {how}: version {version['version']} ({version['change']}), experts "
          f"{version['expert_ids']}")
    return 0


def remove_expert(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _print_module_plan(args, f"delete expert {args.expert} of {args.run_dir} with its partition's records "
                                      f"and the routers that saw them; train a new router; assemble a new version")
    version = modules.remove_expert(args.run_dir, args.expert, _module_launch(args))
    print(f"removed expert {args.expert}: version {version['version']} ({version['change']}), experts "
          f"{version['expert_ids']}")
    return 0


def _print_module_plan(args: argparse.Namespace, what: str) -> int:
    launch = _module_launch(args)
    where = "in this process" if not launch.ray else f"on Ray ({launch.address or 'RAY_ADDRESS, else embedded'})"
    print(f"# plan\n{what}; {where}, {'tracked in MLflow' if launch.track else 'untracked'}")
    return 0


def _module_launch(args: argparse.Namespace) -> runner.Launch:
    return runner.Launch(ray=not args.in_process, address=args.address, track=not args.no_tracking,
                         tracking_uri=args.tracking_uri, register=args.register, wait=args.wait)


def distill(args: argparse.Namespace) -> int:
    if bool(args.run) == bool(args.run_dir):
        raise ConfigError("distill: name the run directory once, as RUN_DIR or --run-dir")
    args.run_dir = args.run or args.run_dir
    student = cli_config.yaml_assignments("--student", args.student)
    try:
        config = dist.DistillConfig(student=student, pairs=args.pairs, pairs_per_shard=args.pairs_per_shard,
                                    dense={"steps": args.dense_steps, "progress": args.progress},
                                    reflow={"steps": args.reflow_steps, "progress": args.progress},
                                    teacher={"strategy": args.teacher_strategy, "solver": "heun",
                                             "steps": args.teacher_steps}, seed=args.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if args.dry_run:
        dist.check(args.run_dir, config)  # an assembled run, a student with its fields, a valid teacher
        where = "in this process" if args.in_process else "the pairs as Ray tasks"
        where += ", untracked" if args.no_tracking else ", tracked in MLflow with the model logged again"
        print(f"# plan\ndistil {args.run_dir}: a dense student ({args.dense_steps} steps), {args.pairs} pairs from "
              f"the ensemble ({args.teacher_strategy}, {args.teacher_steps} Heun steps), a reflow student "
              f"({args.reflow_steps} steps); {where}")
        return 0
    summary = dist.distill_tracked(args.run_dir, config, _module_launch(args))  # checked there before any work
    logged = f"; logged as {summary['model_uri']}" if summary.get("model_uri") else ""
    print(f"distilled {args.run_dir} (ensemble version {summary['ensemble_version']}): dense student "
          f"{'/'.join(summary['dense'])}, few-step student {'/'.join(summary['reflow'])}; sample them with "
          f"`archipelago sample --model student` (or dense){logged}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    run = sdk.load(args.run_dir)
    real = args.real or "the run's own records"
    if args.dry_run:
        print(
            f"# plan\nscore {args.samples} against {real} with metrics {args.metrics or 'all'}, "
            f"{args.repeats} repeats, seed {args.seed}"
        )
        return 0
    generated = sample_files.read(args.samples, run.domain)
    scores = run.evaluate(
        generated, real=args.real, metrics=args.metrics, repeats=args.repeats, seed=args.seed, progress=args.progress
    )
    scores["coverage_tv"] = run.coverage(generated)["total_variation"]  # samples per cluster against the data
    print(sample_files.score_table(scores, as_json=args.json))
    return 0


def diagnose(args: argparse.Namespace) -> int:
    run = sdk.load(args.run_dir)
    if args.dry_run:
        print(f"# plan\nnoise up to {args.records} records of {args.run_dir} at fixed t and score its router")
        return 0
    table = run.router_diagnostics(records=args.records, likelihood_draws=args.likelihood_draws)
    print(table.to_json(orient="records", indent=2) if args.json else table.to_string(index=False,
                                                                                      float_format="%.4f"))
    return 0


def status(args: argparse.Namespace) -> int:
    if args.dry_run:
        print(f"# plan\nread run.json, partition.json, checkpoints and ensemble.json of {args.run_dir}")
        return 0
    print(status_text(run_status(args.run_dir), as_json=args.json))
    return 0


def submit(args: argparse.Namespace) -> int:
    s = cli_config.settings_from_args(args)
    _check_island_flags(args)
    use_token_auth()
    job = jobs.job_for(s, os.environ, args.island, args.expert or ())
    working_dir = os.path.abspath(args.working_dir)
    if "://" not in s.run_dir and not os.path.isabs(s.run_dir):
        print(
            f"{PROG}: warning: run_dir {s.run_dir!r} is relative: on the cluster it lands in the job's temporary "
            "working directory; use shared storage (s3://...) or an absolute shared path",
            file=sys.stderr,
        )
    if not job.env_vars.get(tracking.TRACKING_ENV) and s.launch.track:
        print(
            f"{PROG}: warning: no tracking URI: the job will track into mlflow.db in its temporary working "
            "directory; pass --tracking-uri",
            file=sys.stderr,
        )
    if args.dry_run:
        print(cli_config.to_yaml(s), end="")
        print(
            f"# plan\nsubmission id: {job.submission_id}\naddress: {args.dashboard}\nworking dir: {working_dir} "
            f"(without {', '.join([*jobs.DEFAULT_EXCLUDES, *args.exclude])})\nentrypoint: {' '.join(job.entrypoint)}"
            f"\nenv: {job.env_vars}"
        )
        return 0
    submission_id = jobs.submit_job(
        args.dashboard, job.entrypoint, working_dir, job.env_vars, job.submission_id, excludes=args.exclude
    )
    print(submission_id)
    if not args.wait:
        return 0
    final = jobs.wait_job(args.dashboard, submission_id, args.timeout)
    print(f"job {submission_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


# --- helpers --------------------------------------------------------------------------------------


def _check_island_flags(args: argparse.Namespace) -> None:
    if args.expert and not args.island:
        raise ConfigError("--expert names experts to train on an island: give --island too")


def _print_plan(s: Settings, island: str | None = None, experts: list[int] | None = None) -> int:
    uri = tracking.resolve_tracking_uri(s.launch.tracking_uri) if s.launch.track else None
    ray = cli_config.ray_description(s.launch, os.environ.get("RAY_ADDRESS"))
    if island is None:
        print(f"{cli_config.to_yaml(s)}# plan\n{cli_config.fit_plan(s, uri, ray)}")
        return 0
    c = s.config
    placed = experts or [k for k in range(c.experts) if c.placement_of(k).island == island]
    print(f"{cli_config.to_yaml(s)}# plan\nrun directory: {s.run_dir}\nray: {ray}\ntracking: {uri or 'off'}\n"
          f"island {island}: check everything, ingest and partition unless another island did; train experts "
          f"{placed or '(assigned to it in the manifest)'} there ({c.expert.steps} steps each); no router, no "
          f"assembly: `{PROG} assemble` once every island is done")
    return 0


def _print_step_plan(args: argparse.Namespace, what: str) -> int:
    parent = f"tracked as a child of MLflow run {args.parent_run_id}" if args.parent_run_id else "untracked"
    print(f"# plan\n{what}, in this process, {parent}")
    return 0


def _target(args: argparse.Namespace) -> tasks.TrackingTarget | None:
    """The parent run a step reports to (None: untracked)."""
    if not args.parent_run_id:
        return None
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_tracking(uri)
    return tasks.TrackingTarget(uri, args.parent_run_id)


def _print_report(report: dict) -> None:
    print(
        f"{report['name']}: {report['steps']} steps (resumed from {report['resumed_from']}), "
        f"final loss {report['final_loss']:.4f}, checkpoint {report['checkpoint']}"
    )


# --- the parser -----------------------------------------------------------------------------------


def _run_flags(p: argparse.ArgumentParser, tracked: bool = True) -> None:
    p.add_argument("--run-dir", required=True, help="the run directory")
    if tracked:
        p.add_argument("--parent-run-id", help="track the step as a child of this MLflow run")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")


WRITERS = (fit, partition, train_expert, train_router, assemble, add_data, remove_expert, distill)  # they take a lease


def _module_flags(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """The flags of add-data, remove-expert and distill: the run (`positional`: as RUN_DIR or
    --run-dir), where it trains and how it is tracked."""
    if positional:
        p.add_argument("run", nargs="?", metavar="RUN_DIR", help="the run directory (or --run-dir)")
    p.add_argument("--run-dir", required=not positional, help="the run directory")
    p.add_argument("--address", help="Ray GCS address host:port (default: RAY_ADDRESS, else Ray embedded)")
    p.add_argument("--in-process", action="store_true", help="train in this process, without Ray")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    p.add_argument("--register", metavar="NAME", help="register the new ensemble version under NAME")


def _island_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--island", metavar="NAME",
                   help="only this island's part, on its own cluster: its experts (placement, or --expert), no "
                        "router and no assembly; then `assemble` once every island is done")
    p.add_argument("--expert", type=int, action="append", metavar="K",
                   help="with --island: train expert K there (repeatable), moving it from an island that is gone")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Decentralized diffusion models: K experts on K islands, one router.")
    parser.add_argument("--debug", action="store_true", help="raise errors with their traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dry = Parser(add_help=False)
    dry.add_argument("--dry-run", action="store_true", help="print the resolved settings and the plan; write nothing")

    def command(handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(handler.__name__.replace("_", "-"), parents=[dry], help=help, description=help)
        p.set_defaults(handler=handler)
        if handler in WRITERS:
            p.add_argument("--wait", action="store_true",
                           help="wait while another writer holds the run directory (default: fail naming it)")
        return p

    p = command(fit, "Run (or resume) a whole fit: partition, experts and router, assemble.")
    cli_config.settings_flags(p)
    _island_flags(p)
    p = command(
        partition, "Partition a run's data (given settings: check, ingest and write a new run directory first)."
    )
    cli_config.settings_flags(p, ray=False, launch=False)
    p = command(train_expert, "Train (or resume) one expert in this process.")
    _run_flags(p)
    p.add_argument("--expert", type=int, required=True, metavar="K", help="the expert (partition) to train")
    _run_flags(command(train_router, "Train (or resume) the router in this process."))
    p = command(assemble, "Once every expert is done: train the router (unless done) and write ensemble.json.")
    _run_flags(p)
    p.add_argument("--register", metavar="NAME", help="when tracked: register the logged model as NAME")
    p.add_argument("--experiment", default="archipelago",
                   help="with --tracking-uri and no --parent-run-id: the MLflow experiment of the assembly's run")

    p = command(sample, "Generate samples from an assembled run.")
    _run_flags(p, tracked=False)
    cli_config.sample_flags(p)
    p.add_argument("--out", required=True, metavar="FILE",
                   help=".npy (user units), .csv or .parquet (long table; records for graphs, crystals and images), "
                        ".png (a sample grid of images)")
    p.add_argument("--version", type=positive, help="the ensemble version (default: the newest; see status)")
    p.add_argument("--nearest", type=int, default=3, metavar="N",
                   help="nearest training records per sample in its attribution file (default 3; 0: none)")

    p = command(add_data, "Grow a run with new records: into the nearest clusters, or new partitions.")
    _module_flags(p)
    p.add_argument("--data", required=True, help="the new records (a source the run's domain reads)")
    p.add_argument("--new-partitions", type=int, default=0, metavar="N",
                   help="cluster the new records into N new partitions with new experts (default 0: assign them "
                        "to the nearest clusters, whose experts train on)")
    p.add_argument("--extra-steps", type=positive, metavar="S",
                   help="steps of each changed expert (default: grown experts in proportion to the records added, "
                        "new experts the run's expert.steps)")
    p = command(remove_expert, "Forget one expert: its partition's records, its weights and the routers that saw them.")
    _module_flags(p)
    p.add_argument("--expert", type=int, required=True, metavar="K", help="the expert to remove")

    p = command(distill, "Distil the ensemble into a dense student and a few-step (reflow) student.")
    _module_flags(p, positional=True)
    p.add_argument("--dense-steps", type=positive, default=2000, help="the dense student's steps (default 2000)")
    p.add_argument("--reflow-steps", type=positive, default=2000, help="the few-step student's steps (default 2000)")
    p.add_argument("--pairs", type=positive, default=4096, help="(noise, sample) pairs for reflow (default 4096)")
    p.add_argument("--pairs-per-shard", type=positive, default=1024, help="pairs per task and shard (default 1024)")
    p.add_argument("--teacher-strategy", default="full", help="the routing strategy of the pairs (default full)")
    p.add_argument("--teacher-steps", type=positive, default=20, help="Heun steps of the pairs (default 20)")
    p.add_argument("--student", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the student's network over the run's domain settings (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seeds the students and the pairs (default 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")

    p = command(evaluate, "Score generated samples with the domain's metrics (mean and 95%% interval).")
    _run_flags(p, tracked=False)
    p.add_argument("--samples", required=True, metavar="FILE.npy", help="samples written by `sample` (user units)")
    p.add_argument("--real", metavar="SOURCE", help="real data to compare with (default: the run's records)")
    p.add_argument("--metrics", nargs="+", metavar="NAME", help="metric names (default: every metric of the domain)")
    p.add_argument("--repeats", type=positive, default=5, help="repeats behind the interval (default 5)")
    p.add_argument("--seed", type=int, default=0, help="metrics seed (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar on stderr over each metric's repeats (default: on)")

    p = command(diagnose, "The router's accuracy and calibration (ECE) along t on the run's records.")
    _run_flags(p, tracked=False)
    p.add_argument("--records", type=positive, default=2048, help="records to noise (default 2048)")
    p.add_argument("--likelihood-draws", type=positive, metavar="N",
                   help="score the experts' likelihood router with N noise draws instead of the trained router")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command(status, "Progress of each expert and the router, read from storage.")
    _run_flags(p, tracked=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command(submit, "Submit a fit (or one island's part) as a Ray job, at most once per settings and island.")
    cli_config.settings_flags(p, ray=False)
    _island_flags(p)
    p.add_argument(
        "--address", dest="dashboard", required=True, help="the cluster's dashboard address, http://<head>:8265"
    )
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working directory (default .)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="gitignore-style pattern left out of the upload (repeatable; heavy paths always are)",
    )
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="how long --wait waits (default 3600)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) and usage errors (2)
        return done.code if isinstance(done.code, int) else 0
    try:
        return args.handler(args)
    except (ConfigError, credentials.SecretInConfig) as error:
        return _fail(args, error, 2)
    except RUNTIME_ERRORS as error:
        return _fail(args, error, 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _fail(args: argparse.Namespace, error: BaseException, code: int) -> int:
    if args.debug:
        raise error
    print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
