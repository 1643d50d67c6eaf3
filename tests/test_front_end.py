"""One front end (issue 6, "what must be shown"): bad sampling input is a clear error naming the bad
thing, raised before any sampling work, through each of the SDK, the command line and the MLflow
model; `--set` overrides resolve to the expected RunConfig and name a bad key; Ray and MLflow are
imported only by runs that use them.

"Before any sampling work" is proven with a sentinel: `archipelago.router.sampling.integrate` and
`draw_prior` (the names sampling calls) and `archipelago.experts.solvers.integrate` are replaced by
functions that raise `SamplingStarted`. A bad request must raise its own ValueError instead; a good
request reaching the sentinel shows the sentinel is in the path. The command line must also leave
no samples file behind.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from archipelago.experts import solvers
from archipelago.platform import cli_config, sdk
from archipelago.platform.cli import build_parser, main
from archipelago.platform.cli_config import ConfigError
from archipelago.platform.config import Placement, RunConfig
from archipelago.router import sampling
from tests.toy_graphs import ToyGraphDomain, toy_graphs

TINY = {"steps": 4, "batch_size": 16, "warmup_steps": 1, "progress": False}
SERIES_DOMAIN = {"width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1}
N = 3  # samples per request
WINDOW, CHANNELS = 24, 5  # the windows of "sines:N"
ABSENT_CUDA = f"cuda:{max(7, torch.cuda.device_count())}"  # "cuda:7" here; never a present device


# --- runs: each fitted once per module ------------------------------------------------------------


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory) -> sdk.Run:
    """A conditional domain: categorical `family` (chain, ring), continuous `density`."""
    return sdk.fit(toy_graphs(40), str(tmp_path_factory.mktemp("graphs") / "run"), domain=ToyGraphDomain(),
                   experts=2, expert=TINY, router=TINY)


@pytest.fixture(scope="module")
def series_run(tmp_path_factory) -> sdk.Run:
    """A domain without conditions (time series); field x is [n, 24, 5]."""
    return sdk.fit("sines:64", str(tmp_path_factory.mktemp("series") / "run"), experts=2, expert=TINY,
                   router=TINY, domain_config=SERIES_DOMAIN)


@pytest.fixture
def runs(graph_run, series_run) -> dict[str, sdk.Run]:
    return {"graph": graph_run, "series": series_run}


class SamplingStarted(AssertionError):  # noqa: N818  (not a ValueError: no front end may catch it)
    """Raised by the sentinels: sampling work began."""


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise SamplingStarted("sampling work started before the request was refused")

    monkeypatch.setattr(sampling, "integrate", refuse)
    monkeypatch.setattr(sampling, "draw_prior", refuse)
    monkeypatch.setattr(solvers, "integrate", refuse)


# --- the bad inputs: (id, run, request fields, what the message must name) -------------------------

BAD = [
    ("unknown-condition", "graph", {"conditions": {"famly": "ring"}}, r"famly"),
    ("class-name-outside-classes", "graph", {"conditions": {"family": "star"}}, r"'family'.*'star'"),
    ("class-index-outside-classes", "graph", {"conditions": {"family": 2}}, r"'family'.*\b2\b"),
    ("continuous-not-a-number", "graph", {"conditions": {"density": "dense"}}, r"'density'.*'dense'"),
    ("guidance-without-conditions", "series", {"guidance": 2.0}, r"guidance 2\.0.*timeseries"),
    ("guidance-zero-without-conditions", "series", {"guidance": 0.0}, r"guidance 0\.0.*timeseries"),
    ("condition-on-a-domain-without", "series", {"conditions": {"family": "ring"}}, r"family"),
    ("given-wrong-shape", "series", {"given": {"x": np.zeros((N, CHANNELS))}}, r"'x'.*shape \(3, 5\)"),
    ("given-wrong-count", "series", {"given": {"x": np.zeros((N - 1, WINDOW, CHANNELS))}},
     r"'x'.*shape \(2, 24, 5\)"),
    ("given-unknown-field", "series", {"given": {"y": np.zeros((WINDOW, CHANNELS))}}, r"'y'"),
    ("device-not-present", "series", {"device": ABSENT_CUDA}, rf"device.*{ABSENT_CUDA}"),
    ("device-nonsense", "series", {"device": "tpu"}, r"device.*tpu"),
    ("device-not-present-conditional", "graph", {"device": ABSENT_CUDA, "conditions": {"family": "ring"}},
     rf"device.*{ABSENT_CUDA}"),
]
BAD_IDS = [case[0] for case in BAD]
BAD_CASES = [case[1:] for case in BAD]

# Good requests of each run: they must reach the sentinel (so the sentinel is in the path).
GOOD = {"graph": {"conditions": {"family": "ring", "density": 0.5}, "guidance": 2.0, "steps": 1},
        "series": {"given": {"x": np.full((WINDOW, CHANNELS), np.nan)}, "steps": 1}}


def cli_flags(settings: dict, folder: Path) -> list[str]:
    """The `archipelago sample` flags of request fields (given arrays written to .npy files)."""
    flags = []
    for name, value in settings.get("conditions", {}).items():
        flags += ["--condition", f"{name}={value}"]
    for name, value in settings.get("given", {}).items():
        path = folder / f"given-{name}.npy"
        np.save(path, value)
        flags += ["--given", f"{name}={path}"]
    for name in ("guidance", "device", "steps"):
        if name in settings:
            flags += [f"--{name}", str(settings[name])]
    return flags


def mlflow_request(settings: dict) -> dict:
    """A request as MLflow's JSON input holds it: plain lists, no numpy arrays."""
    given = {name: np.asarray(value).tolist() for name, value in settings.get("given", {}).items()}
    return {"n": N, **settings, **({"given": given} if given else {})}


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("archipelago: error:"), lines
    return lines[0]


@pytest.fixture
def mlflow_model():
    """The pyfunc model class, loaded in process with a context whose artifact is a run directory."""
    from archipelago.platform.mlflow_model import EnsembleModel
    from archipelago.platform.tracking import MODEL_ARTIFACT

    def load(run: sdk.Run) -> EnsembleModel:
        model = EnsembleModel()
        model.load_context(types.SimpleNamespace(artifacts={MODEL_ARTIFACT: run.run_dir}))
        return model

    return load


# --- 1. bad input, through each front end, before sampling ------------------------------------------


@pytest.mark.parametrize(("which", "settings", "names"), BAD_CASES, ids=BAD_IDS)
def test_sdk_request_refuses_bad_input_naming_it(runs, no_sampling, which, settings, names):
    with pytest.raises(ValueError, match=names):
        runs[which].request(N, **settings)


@pytest.mark.parametrize(("which", "settings", "names"), BAD_CASES, ids=BAD_IDS)
def test_sdk_sample_refuses_bad_input_before_sampling(runs, no_sampling, which, settings, names):
    with pytest.raises(ValueError, match=names):
        runs[which].sample(N, **settings)


@pytest.mark.parametrize(("which", "settings", "names"), BAD_CASES, ids=BAD_IDS)
def test_cli_sample_refuses_bad_input_and_writes_no_samples(runs, no_sampling, tmp_path, capsys, which, settings,
                                                            names):
    out = tmp_path / "samples.npy"
    code = main(["sample", "--run-dir", runs[which].run_dir, "-n", str(N), *cli_flags(settings, tmp_path),
                 "--out", str(out)])
    assert code != 0
    assert re.search(names, one_line_error(capsys))
    assert not out.exists()


@pytest.mark.parametrize(("which", "settings", "names"), BAD_CASES, ids=BAD_IDS)
def test_mlflow_model_refuses_bad_input_before_sampling(runs, no_sampling, mlflow_model, which, settings, names):
    from archipelago.platform.mlflow_model import parse_request

    request = mlflow_request(settings)
    with pytest.raises(ValueError, match=names):
        mlflow_model(runs[which]).predict(None, request)
    # The same through the documented pieces: parse_request, then the SDK.
    with pytest.raises(ValueError, match=names):
        sdk.load(runs[which].run_dir).sample(parse_request(request))


def test_mlflow_one_row_dataframe_request_is_checked_alike(graph_run, no_sampling, mlflow_model):
    frame = pd.DataFrame([{"n": N, "conditions": {"family": "star"}, "guidance": 2.0}])
    with pytest.raises(ValueError, match=r"'family'.*'star'"):
        mlflow_model(graph_run).predict(None, frame)


@pytest.mark.parametrize(("which", "out", "names"), [
    ("series", "missing/samples.npy", r"the folder .*missing does not exist"),
    ("series", "folder.npy", r"folder.npy is a directory"),
    ("graph", "samples.csv", r"does not decode to tables"),
], ids=["missing-folder", "a-directory", "table-of-a-domain-without-tables"])
def test_a_bad_out_path_is_refused_before_sampling(runs, no_sampling, tmp_path, monkeypatch, capsys, which, out,
                                                   names):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.npy").mkdir()
    assert main(["sample", "--run-dir", runs[which].run_dir, "-n", str(N), "--out", out]) == 1
    assert re.search(names, one_line_error(capsys))


@pytest.mark.parametrize("which", ["graph", "series"])
def test_good_requests_reach_the_sentinel_in_every_front_end(runs, no_sampling, mlflow_model, tmp_path, which):
    """The control: the sentinels sit on the sampling path, so the refusals above came before it."""
    run, settings = runs[which], GOOD[which]
    run.request(N, **settings)  # checks pass
    with pytest.raises(SamplingStarted):
        run.sample(N, **settings)
    out = tmp_path / "samples.npy"
    with pytest.raises(SamplingStarted):
        main(["sample", "--run-dir", run.run_dir, "-n", str(N), *cli_flags(settings, tmp_path), "--out", str(out)])
    assert not out.exists()
    with pytest.raises(SamplingStarted):
        mlflow_model(run).predict(None, mlflow_request(settings))


def test_cli_in_a_fresh_process_refuses_guidance_without_conditions(series_run, tmp_path):
    out = tmp_path / "samples.npy"
    done = subprocess.run([sys.executable, "-m", "archipelago.platform.cli", "sample", "--run-dir",
                           series_run.run_dir, "-n", str(N), "--guidance", "2", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode != 0, done.stdout
    assert "guidance 2.0 needs conditions" in done.stderr and "timeseries" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()


def test_cli_bad_device_is_a_usage_error_naming_the_flag(series_run, no_sampling, tmp_path, capsys):
    out = tmp_path / "samples.npy"
    assert main(["sample", "--run-dir", series_run.run_dir, "--device", "tpu", "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert "--device" in line and "'tpu'" in line
    assert not out.exists()


def test_fit_on_a_device_that_is_not_present_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=rf"device.*{ABSENT_CUDA}"):
        sdk.fit("sines:64", str(tmp_path / "run"), experts=2, expert=TINY, router=TINY,
                domain_config=SERIES_DOMAIN, device=ABSENT_CUDA)
    assert not (tmp_path / "run").exists()


# --- 2. OmegaConf dotted overrides -----------------------------------------------------------------

FILE = {"data": "sines:64", "experts": 2, "placement": [{"island": "x"}, {"island": "y"}]}


@pytest.fixture
def settings_file(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **FILE}))
    return path


def resolved(path: Path, *flags: str) -> cli_config.Settings:
    return cli_config.settings_from_args(build_parser().parse_args(["fit", str(path), *flags]))


def test_set_overrides_produce_the_expected_run_config(settings_file):
    s = resolved(settings_file, "--set", "expert.steps=3", "--set", "placement.0.island=a",
                 "--set", "partition.balanced=false", "--set", "expert.lr=0.01")
    expected = RunConfig(data="sines:64", experts=2, expert={"steps": 3, "lr": 0.01}, partition={"balanced": False},
                         placement=[{"island": "a"}, {"island": "y"}])
    assert s.config == expected
    assert s.config.expert.steps == 3 and isinstance(s.config.expert.steps, int)
    assert s.config.placement == [Placement(island="a"), Placement(island="y")]


def test_a_set_into_the_router_keeps_the_routers_other_defaults(settings_file):
    s = resolved(settings_file, "--set", "router.lr=0.01")
    assert s.config.router.steps == RunConfig().router.steps == 500
    assert s.config.router == RunConfig().router.model_copy(update={"lr": 0.01})


def test_sdk_fit_and_the_command_line_resolve_the_same_default_router(settings_file, monkeypatch, tmp_path):
    from archipelago.platform import runner

    seen = []
    monkeypatch.setattr(runner, "fit", lambda config, *args, **kwargs: seen.append(config) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        sdk.fit("sines:64", str(tmp_path / "run"), experts=2)
    assert seen[0].router.steps == resolved(settings_file).config.router.steps == 500
    assert seen[0].router == resolved(settings_file).config.router == RunConfig().router


def test_sets_apply_in_order_then_named_flags_win(settings_file):
    s = resolved(settings_file, "--set", "expert.steps=3", "--set", "expert.steps=4", "--set", "seed=5",
                 "--seed", "9")
    assert s.config.expert.steps == 4 and s.config.seed == 9


def test_set_replaces_a_whole_list_then_indexes_into_it(settings_file):
    s = resolved(settings_file, "--set", "placement=[{island: a}, {island: b}]", "--set", "placement.1.num_cpus=2")
    assert s.config.placement == [Placement(island="a"), Placement(island="b", num_cpus=2.0)]


@pytest.mark.parametrize(("assignment", "named"), [
    # an unknown key: the message names it
    ("expert.stepz=3", "expert.stepz"),
    ("expertz.steps=3", "expertz"),
    ("placement.0.isle=a", "placement.0.isle"),
    ("placement.5.island=a", "placement.5.island"),
    # a wrong type: the message names the key, then what is wrong with it
    ("expert.steps=abc", "expert.steps: "),
    ("expert.steps=3.5", "expert.steps: "),
    ("placement.0.num_cpus=lots", "placement.0.num_cpus: "),
    ("experts=three", "experts: "),
    ("partition.balanced=maybe", "partition.balanced: "),
])
def test_a_bad_set_is_an_error_naming_the_key(settings_file, tmp_path, monkeypatch, capsys, assignment, named):
    with pytest.raises(ConfigError, match=rf"{re.escape(named)}(\b|$)"):
        resolved(settings_file, "--set", assignment)
    monkeypatch.chdir(tmp_path)
    assert main(["fit", str(settings_file), "--dry-run", "--set", assignment]) == 2
    assert named in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing written


def test_a_set_without_a_value_is_an_error_naming_it(settings_file):
    with pytest.raises(ConfigError, match=r"--set 'expert\.steps': expected dotted\.key=value"):
        resolved(settings_file, "--set", "expert.steps")


# --- 3. lazy imports: Ray and MLflow only for runs that use them -----------------------------------

PRINT_MODULES = "print('ray' in sys.modules, 'mlflow' in sys.modules)"


def python(code: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_importing_the_sdk_imports_neither_ray_nor_mlflow(tmp_path):
    assert python(f"import archipelago.platform.sdk, sys; {PRINT_MODULES}", cwd=tmp_path) == "False False"


def test_an_in_process_fit_and_sample_import_neither_ray_nor_mlflow(tmp_path):
    code = (
        "import sys, json\n"
        "from archipelago.platform import sdk\n"
        "tiny = json.loads(sys.argv[2])\n"
        "domain = json.loads(sys.argv[3])\n"
        "run = sdk.fit('sines:64', sys.argv[1], experts=2, expert=tiny, router=tiny, domain_config=domain)\n"
        "out = sdk.load(sys.argv[1]).sample(4, strategy='top1', steps=2)\n"
        "assert out.items.shape == (4, 24, 5), out.items.shape\n"
        f"{PRINT_MODULES}\n"
    )
    line = python(code, str(tmp_path / "run"), json.dumps(TINY), json.dumps(SERIES_DOMAIN), cwd=tmp_path)
    assert line == "False False"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
