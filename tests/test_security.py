"""Security: settings that hold a credential are refused before anything is written, by the command
line and the SDK, naming the key and never the value; no secret of the environment reaches MLflow,
the run directory or a Ray job's environment; nothing in the package can unpickle a file."""

from __future__ import annotations

import ast
import dataclasses
import json
import random
import string
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from archipelago.domains import DOMAINS, domain_class
from archipelago.platform import cli_config, credentials, jobs, sdk, tracking
from archipelago.platform.cli import main
from archipelago.platform.config import RunConfig
from archipelago.platform.credentials import SecretInConfig
from archipelago.platform.runner import Launch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("platform", "experts", "router", "domains")
TINY = {"steps": 4, "batch_size": 16, "warmup_steps": 1, "progress": False}
DOMAIN_CONFIG = {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1}
SETTINGS = {"data": "sines:200", "experts": 2, "domain_config": DOMAIN_CONFIG, "expert": TINY, "router": TINY}


def secret() -> str:
    """A distinctive random value, found nowhere by chance."""
    return f"s3cr3t{uuid.uuid4().hex}"


def aws_key_id() -> str:
    return "AKIA" + "".join(random.choices(string.ascii_uppercase + string.digits, k=16))


def write_settings(folder: Path, **changes) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(folder / "run"), **SETTINGS, **changes}))
    return path


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- credentials in settings are refused before anything is written --------------------------------

# Each kind of credential: (settings changes, the key the error must name, the secret it must not show).
def _cases() -> dict[str, tuple[dict, str, str]]:
    s, key_id = secret(), aws_key_id()
    return {
        "run_dir with a password": ({"run_dir": f"s3://{key_id}:{s}@bucket/runs/x"}, "run_dir", s),
        "data with a password": ({"data": f"http://user:{s}@host/data.csv"}, "data", s),
        "a credential query parameter": (
            {"run_dir": f"s3://bucket/x?endpoint_override=localhost:9000&secret_key={s}"}, "run_dir", s),
        "a tracking URI with a password": ({"tracking_uri": f"http://user:{s}@mlflow:5000"}, "tracking_uri", s),
        "a key named like a credential, in domain_config": (
            {"domain_config": {**DOMAIN_CONFIG, "api_token": s}}, "domain_config.api_token", s),
        "a key named like a credential, at the top": ({"aws_secret_access_key": s}, "aws_secret_access_key", s),
        "an AWS access key id in a list": (
            {"domain_config": {**DOMAIN_CONFIG, "columns": [key_id]}}, "domain_config.columns.0", key_id),
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_command_line_refuses_a_credential_in_settings(case: str, tmp_path: Path, capsys) -> None:
    changes, key, value = CASES[case]
    settings = write_settings(tmp_path, **changes)
    assert main(["fit", str(settings), "--in-process", "--no-tracking"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("archipelago: error:") and key in lines[0], lines
    assert value not in out + err
    assert files_under(tmp_path) == ["run.yaml"]  # no run directory, no tracking store


@pytest.mark.parametrize("command", [["fit", "--in-process", "--no-tracking"], ["partition"],
                                     ["submit", "--address", "http://127.0.0.1:8265"]])
def test_every_command_that_takes_settings_refuses_them(command: list[str], tmp_path: Path, capsys) -> None:
    """`submit` too: its settings would travel in the job's entrypoint, shown by the Ray dashboard."""
    s = secret()
    settings = write_settings(tmp_path, domain_config={**DOMAIN_CONFIG, "password": s})
    assert main([command[0], str(settings), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "run.yaml: domain_config.password" in err and s not in err
    assert files_under(tmp_path) == ["run.yaml"]


def test_a_credential_given_by_a_flag_is_named_by_the_flag(tmp_path: Path, capsys) -> None:
    s = secret()
    settings = write_settings(tmp_path)
    assert main(["fit", str(settings), "--in-process", "--no-tracking", "--set", f"domain_config.password={s}"]) == 2
    assert main(["fit", str(settings), "--in-process", "--no-tracking", "--run-dir", f"s3://u:{s}@bucket/x"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("archipelago: error: --set domain_config.password:")
    assert lines[1].startswith("archipelago: error: --run-dir:") and "AWS_ACCESS_KEY_ID" in lines[1]
    assert not any(s in line for line in lines)


@pytest.mark.parametrize("where", ["domain_config", "data", "run_dir", "tracking"])
def test_the_sdk_refuses_a_credential_before_writing(where: str, tmp_path: Path) -> None:
    s = secret()
    run_dir = tmp_path / "run"
    arguments = {"data": "sines:200", "run_dir": str(run_dir), "domain_config": DOMAIN_CONFIG}
    key = {"domain_config": "domain_config.client_secret", "data": "data", "run_dir": "run_dir",
           "tracking": "tracking_uri"}[where]
    if where == "domain_config":
        arguments["domain_config"] = {**DOMAIN_CONFIG, "client_secret": s}
    elif where == "tracking":
        arguments["tracking"] = f"https://user:{s}@mlflow.example.com"
    else:
        arguments[where] = f"s3://user:{s}@bucket/{where}"
    with pytest.raises(SecretInConfig) as raised:
        sdk.fit(arguments.pop("data"), arguments.pop("run_dir"), experts=2, expert=TINY, router=TINY, **arguments)
    assert str(raised.value).startswith(f"{key}: ") and s not in str(raised.value)
    assert files_under(tmp_path) == []


# --- what is not a credential passes ------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "s3://bucket/runs/x",
    "s3://bucket/x?region=us-east-1&endpoint_override=localhost:9000",
    "gs://bucket/runs/x",
    "http://mlflow:5000",
    "https://user@mlflow.example.com",
    "sqlite:////tmp/mlflow.db",
    "databricks://profile:prefix",
    "sines:200",
    "/data/AKIA-results/file.csv",
])
def test_ordinary_locations_are_not_credentials(value: str) -> None:
    assert credentials.find({"run_dir": value, "data": value, "tracking_uri": value}) is None


def test_no_setting_of_the_run_or_of_any_domain_is_taken_for_a_credential() -> None:
    """Model settings named like `token_dim`, `tokens` or `use_token` (a flag) are not credentials."""
    model_like = {"token_dim": 64, "tokens": 256, "max_tokens": 8, "use_token": True, "password": "", "key": "label"}
    assert credentials.find({**RunConfig().model_dump(mode="json"), **dataclasses.asdict(Launch())}) is None
    assert credentials.find({"domain_config": model_like}) is None
    for name in DOMAINS:
        assert credentials.find({"domain_config": domain_class(name).from_config({}).to_config()}) is None, name


# --- no secret of the environment is logged --------------------------------------------------------


ENVIRONMENT_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN",
                       "MY_API_TOKEN")


@pytest.fixture
def secret_environment(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {name: aws_key_id() if name == "AWS_ACCESS_KEY_ID" else secret() for name in ENVIRONMENT_SECRETS}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def logged_texts(uri: str, download_to: Path) -> dict[str, str]:
    """Every param, tag and metric key of every run, and every artifact of every run, as text by where."""
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    texts: dict[str, str] = {}
    for run in client.search_runs(experiments):
        name, data = run.info.run_name, run.data
        texts |= {f"{name} param {k}": f"{k}={v}" for k, v in data.params.items()}
        texts |= {f"{name} tag {k}": f"{k}={v}" for k, v in data.tags.items()}
        texts |= {f"{name} metric {k}": k for k in data.metrics}
        folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(download_to / name),
                                                          tracking_uri=uri))
        texts |= {f"{name} artifact {p.relative_to(folder)}": p.read_bytes().decode("latin-1")
                  for p in folder.rglob("*") if p.is_file()}
    for model in client.search_logged_models(experiments):
        texts |= {f"model {model.name} {k}": f"{k}={v}" for k, v in {**model.tags, **model.params}.items()}
    return texts


def test_a_tracked_fit_logs_no_secret_of_the_environment(secret_environment, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = write_settings(tmp_path)
    assert main(["fit", str(settings), "--in-process", "--tracking-uri", uri, "--experiment", "secure"]) == 0
    texts = logged_texts(uri, tmp_path / "downloaded")
    assert any(key.endswith("artifact config.json") for key in texts)  # the scan saw the logged artifacts
    assert f"run_dir={tmp_path / 'run'}" in texts.values()  # ... and the tags
    assert len([p for p in (tmp_path / "run").rglob("*") if p.is_file()]) > 10
    # Every file: the run directory, the tracking store and its artifacts (logged models' too).
    files = {f"file {p}": (tmp_path / p).read_bytes().decode("latin-1")
             for p in files_under(tmp_path) if (tmp_path / p).is_file()}
    everything = {**texts, **files}
    leaks = [(where, name) for where, text in everything.items()
             for name, value in secret_environment.items() if value in text]
    assert leaks == []


def test_a_step_on_a_run_directory_with_a_credential_tags_it_masked(tmp_path: Path) -> None:
    """Steps run on `--run-dir` outside the settings check; their tags (paths) are logged masked."""
    s = secret()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.start_parent(uri, "masked", {"domain": "timeseries"}, f"s3://user:{s}@bucket/run")
    with tracking.ChildRun(uri, parent, "expert-0", {"checkpoint": f"s3://b/run?secret_key={s}"}) as child:
        child.set_tags({"checkpoint": f"s3://b/run/experts?session_token={s}&region=eu"})
    client = mlflow.MlflowClient(uri)
    tags = [client.get_run(parent).data.tags, client.get_run(child.run_id).data.tags]
    assert tags[0]["run_dir"] == "s3://***@bucket/run"
    assert tags[1]["checkpoint"] == "s3://b/run/experts?session_token=***&region=eu"


def test_a_tracking_uri_with_a_password_is_refused_wherever_it_comes_from(monkeypatch) -> None:
    s = secret()
    with pytest.raises(SecretInConfig, match=r"^tracking_uri: .*MLFLOW_TRACKING_PASSWORD") as raised:
        tracking.resolve_tracking_uri(f"http://user:{s}@mlflow:5000")
    assert s not in str(raised.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://user:{s}@mlflow.example.com")
    with pytest.raises(SecretInConfig, match=r"^MLFLOW_TRACKING_URI: ") as raised:
        tracking.resolve_tracking_uri(None)
    assert s not in str(raised.value)


def test_a_ray_job_environment_holds_no_secret(secret_environment, tmp_path: Path) -> None:
    """The job's runtime environment and entrypoint are shown by the Ray dashboard."""
    settings = cli_config.resolve(None, {"run_dir": str(tmp_path / "run"), "data": "sines:200"})
    environ = {**secret_environment, "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    job = jobs.job_for(settings, environ)
    assert job.env_vars == {"RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    shown = json.dumps(dataclasses.asdict(job))
    assert not [name for name, value in secret_environment.items() if value in shown]
    s = secret()
    with pytest.raises(SecretInConfig) as raised:
        jobs.job_for(settings, {**environ, "MLFLOW_TRACKING_URI": f"http://user:{s}@mlflow:5000"})
    assert s not in str(raised.value)


# --- nothing in the package unpickles ----------------------------------------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve"}
LOADERS = {"torch.load", "torch.serialization.load", "torch.jit.load", "torch.hub.load"}
NUMPY = {"np", "numpy"}


def _dotted(node: ast.AST) -> str:
    """`torch.serialization.load` for that attribute chain ("" where it does not start at a name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unpickling(source: str) -> list[tuple[int, str]]:
    """(line, what) of each place in Python source that can unpickle a file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES or (node.module == "torch" and any(
                    a.name == "load" for a in node.names)):
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, last = name.rpartition(".")
            if name in LOADERS or last == "read_pickle" or (head in PICKLE_MODULES and last in ("load", "loads")):
                found.append((node.lineno, f"{name}(...)"))
            elif head in NUMPY and last == "load" and any(k.arg == "allow_pickle" for k in node.keywords) \
                    and not _keyword_is(node, "allow_pickle", False):
                found.append((node.lineno, f"{name}(..., allow_pickle=...)"))
            elif last == "from_pretrained" and not _keyword_is(node, "use_safetensors", True):
                found.append((node.lineno, f"{name}(...) without use_safetensors=True (falls back to a pickle)"))
    return found


def test_the_scan_finds_each_way_to_unpickle() -> None:
    # The probe is a text file, so that no source file of the project holds an unpickling call.
    source = (Path(__file__).parent / "unpickling_probe.txt").read_text()
    assert sorted(line for line, _ in unpickling(source)) == [1, 3, 4, 5, 6, 7, 8]


def test_nothing_in_the_package_can_unpickle() -> None:
    files = [p for folder in PACKAGE_FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 40
    found = [f"{path.relative_to(ROOT)}:{line}: {what}"
             for path in files for line, what in sorted(unpickling(path.read_text()))]
    assert found == [], "checkpoints and weights load only from safetensors and JSON:\n" + "\n".join(found)


def _record_torch_loads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every later call of `torch.load` (which a library may catch and re-raise as another error)."""
    calls: list = []
    original = torch.load

    def load(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return calls


def test_a_pretrained_autoencoder_in_a_pickle_is_refused_not_unpickled(tmp_path: Path, monkeypatch) -> None:
    from diffusers import AutoencoderKL

    from archipelago.domains.images.networks import pretrained_autoencoder

    model = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, down_block_types=("DownEncoderBlock2D",),
                          up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), norm_num_groups=8)
    model.save_pretrained(tmp_path / "vae", safe_serialization=False)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.bin").exists()
    calls = _record_torch_loads(monkeypatch)
    with pytest.raises(ValueError, match="safetensors"):
        pretrained_autoencoder(str(tmp_path / "vae"), channels=1, latent_channels=None)
    assert calls == []


def test_dinov2_weights_in_a_pickle_are_refused_not_unpickled(tmp_path: Path, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers", reason="the DINOv2 extractor needs Hugging Face transformers")
    from archipelago.domains.images.features import Dinov2Features

    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, image_size=28, patch_size=7)
    config.save_pretrained(tmp_path / "dinov2")
    torch.save(transformers.Dinov2Model(config).state_dict(), tmp_path / "dinov2" / "pytorch_model.bin")
    calls = _record_torch_loads(monkeypatch)
    with pytest.raises(ValueError, match="cannot load a DINOv2 model"):
        Dinov2Features(str(tmp_path / "dinov2"))
    assert calls == []
