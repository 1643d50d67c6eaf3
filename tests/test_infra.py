"""The deployment files in infra/: each parses, passes the checks of the tool that reads it, and
agrees with the others and with the product (the island label, the Ray version, the run config,
the console script, the README's deployment section). No network, no Docker, no Kubernetes."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from archipelago.platform.islands import ISLAND_LABEL

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
# The services the README's deployment section describes; the compose file must run exactly these.
TRACKING_SERVICES = {"postgres", "minio", "minio-init", "mlflow"}
# Secrets the Ray containers read: the run's object storage and the tracking server.
RAY_SECRETS = {"archipelago-storage", "archipelago-tracking"}
CREDENTIAL = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$|_USER$|TRACKING_URI")
LAUNCHER_COMMANDS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                     "head_start_ray_commands", "worker_start_ray_commands")


def load(relative: str) -> dict:
    return yaml.safe_load((INFRA / relative).read_text())


def documents(relative: str) -> dict[str, dict]:
    """The documents of a multi-document manifest, by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all((INFRA / relative).read_text())}


def dockerfile(relative: str = "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continued lines joined."""
    instructions, pending = [], ""
    for line in (INFRA / relative).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):  # Docker drops these, within continuations too
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def arg_default(name: str) -> str:
    return next(a.partition("=")[2] for kind, a in dockerfile() if kind == "ARG" and a.startswith(f"{name}="))


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def launcher_islands(config: dict) -> dict[str, dict]:
    return {name: node for name, node in config["available_node_types"].items() if name != config["head_node_type"]}


def cluster_specs() -> dict[str, dict]:
    return {"RayCluster": load("kuberay/raycluster.yaml")["spec"],
            "RayJob": documents("kuberay/rayjob.yaml")["RayJob"]["spec"]["rayClusterSpec"]}


def ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


def group_islands(spec: dict) -> set[str]:
    return {group["labels"][ISLAND_LABEL] for group in spec["workerGroupSpecs"]}


# --- the folder ---------------------------------------------------------------------------------


def test_infra_is_not_a_python_package():
    assert not list(INFRA.rglob("__init__.py"))


# --- the Ray cluster launcher -------------------------------------------------------------------


def test_cluster_launcher_config_passes_rays_schema():
    schema = json.loads((importlib.resources.files("ray.autoscaler") / "ray-schema.json").read_text())
    jsonschema.validate(load("ray-cluster.yaml"), schema)


def ray_up_checks(config: dict) -> dict:
    """The config as `ray up` sees it before it contacts the cloud: Ray's defaults for the provider
    merged in, then Ray's own validation (the schema and the rules across fields: head_node_type
    names a node type, max_workers covers every min_workers, the docker settings are whole).

    Ray offers no public API for this; these are the private functions `ray up` calls first, kept
    in this one place so that a Ray release that moves them breaks one helper.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_launcher_config_passes_ray_ups_checks():
    config = load("ray-cluster.yaml")
    prepared = ray_up_checks(config)
    assert prepared["available_node_types"].keys() == config["available_node_types"].keys()  # none of Ray's


def test_cluster_launcher_sets_every_command_list():
    """A list left out falls back to Ray's AWS defaults, which install another Ray over the image's."""
    assert set(LAUNCHER_COMMANDS) <= load("ray-cluster.yaml").keys()


def test_each_island_is_a_labelled_gpu_node_type_that_keeps_its_nodes():
    config = load("ray-cluster.yaml")
    islands = launcher_islands(config)
    assert len(islands) >= 2
    labels = [node["labels"] for node in islands.values()]
    assert all(node_labels.keys() == {ISLAND_LABEL} for node_labels in labels)
    assert len({node_labels[ISLAND_LABEL] for node_labels in labels}) == len(islands)
    # The launcher's autoscaler starts nodes for resources, not for label selectors: an island
    # without nodes would fail every placement on it (islands.MissingIslandError).
    assert all(node["min_workers"] >= 1 and node["resources"]["GPU"] >= 1 for node in islands.values())
    assert ISLAND_LABEL not in config["available_node_types"][config["head_node_type"]].get("labels", {})


def test_every_ray_start_uses_token_auth_and_every_node_gets_the_token():
    config = load("ray-cluster.yaml")
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token" in command for command in starts)
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_cluster_launcher_clears_the_images_entry_point():
    """The launcher starts its containers with `bash`, which the image's entry point would swallow."""
    assert any(kind == "ENTRYPOINT" for kind, _ in dockerfile())
    options = load("ray-cluster.yaml")["docker"]["run_options"]
    assert any(re.fullmatch(r"--entrypoint(=|\s+)(\"\"|'')", option) for option in options)


# --- KubeRay -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifests_have_the_fields_kuberay_requires(kind):
    spec = cluster_specs()[kind]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    for group in [head, *spec["workerGroupSpecs"]]:
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())  # map[string]string
        container = group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first
        assert container["name"] and container["image"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        # Without the autoscaler KubeRay requires both bounds, and refuses minReplicas > maxReplicas.
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_both_manifests_are_ray_io_v1():
    manifests = [load("kuberay/raycluster.yaml"), documents("kuberay/rayjob.yaml")["RayJob"]]
    assert [(m["apiVersion"], m["kind"]) for m in manifests] == [("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")]
    assert all(m["metadata"]["name"] for m in manifests)


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_worker_groups_are_islands_labelled_the_kuberay_way(kind):
    spec = cluster_specs()[kind]
    groups = spec["workerGroupSpecs"]
    assert len(groups) >= 2 and len(group_islands(spec)) == len(groups)
    assert len({group["groupName"] for group in groups}) == len(groups)
    for group in groups:
        assert group["labels"].keys() == {ISLAND_LABEL}
        assert "labels" not in group["rayStartParams"]  # KubeRay >= 1.5 refuses them there
        assert int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_runs_the_images_ray_with_token_auth(kind):
    spec = cluster_specs()[kind]
    assert spec["rayVersion"] == arg_default("RAY_VERSION")
    assert spec["authOptions"]["mode"] == "token"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_every_ray_container_takes_its_credentials_from_secrets(kind):
    for container in ray_containers(cluster_specs()[kind]):
        literal = [e["name"] for e in container.get("env", []) if "value" in e and CREDENTIAL.search(e["name"])]
        assert not literal, f"{container['name']}: literal credentials {literal}"
        assert {source["secretRef"]["name"] for source in container["envFrom"]} >= RAY_SECRETS


def test_rayjob_cluster_has_the_standing_clusters_islands():
    specs = cluster_specs()
    assert specs["RayJob"]["workerGroupSpecs"] == specs["RayCluster"]["workerGroupSpecs"]


def test_rayjob_runs_archipelago_fit_on_the_mounted_run_config():
    manifest = documents("kuberay/rayjob.yaml")
    job = manifest["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["archipelago", "fit"]
    assert job["shutdownAfterJobFinishes"] is True
    config_path = PurePosixPath(argv[2])
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == manifest["ConfigMap"]["metadata"]["name"]
    assert config_path.name in manifest["ConfigMap"]["data"]


def test_rayjob_run_config_is_valid_and_places_experts_on_the_clusters_islands():
    from archipelago.platform.config import RunConfig, validate_domain

    manifest = documents("kuberay/rayjob.yaml")
    config_file = PurePosixPath(shlex.split(manifest["RayJob"]["spec"]["entrypoint"])[2]).name
    raw = yaml.safe_load(manifest["ConfigMap"]["data"][config_file])
    run_dir = raw.pop("run_dir")
    config = RunConfig(**raw)
    validate_domain(config)
    assert "://" in run_dir and not run_dir.startswith("file:")  # the Pods share no disk
    groups = {g["labels"][ISLAND_LABEL]: g for g in manifest["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert config.islands() == groups.keys()
    for k in range(config.experts):
        placement = config.placement_of(k)
        gpus = groups[placement.island]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert placement.num_gpus <= int(gpus)


def test_every_deployment_has_the_same_islands():
    launcher = {node["labels"][ISLAND_LABEL] for node in launcher_islands(load("ray-cluster.yaml")).values()}
    assert {kind: group_islands(spec) for kind, spec in cluster_specs().items()} == {
        "RayCluster": launcher, "RayJob": launcher}


# --- the tracking server -------------------------------------------------------------------------


def test_compose_runs_the_services_the_readme_describes():
    assert load("docker-compose.yml")["services"].keys() == TRACKING_SERVICES
    section = readme_section("Deployment")
    assert "infra/docker-compose.yml" in section
    assert all(f"`{service}`" in section for service in TRACKING_SERVICES)


def test_compose_takes_every_credential_from_the_environment():
    compose = load("docker-compose.yml")
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if CREDENTIAL.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:[?-][^}]*)?\}", str(value)), f"{name}: {key} is literal"
    text = (INFRA / "docker-compose.yml").read_text()
    for user, password in re.findall(r"://([^:/\s@]+):([^@\s]+)@", text):
        assert user.startswith("${") and password.startswith("${"), f"literal credentials in a URL: {user}"


def test_compose_variables_are_the_ones_env_example_lists():
    """Container-side `$${VAR}` aside, every variable compose reads is documented in .env.example."""
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", (INFRA / "docker-compose.yml").read_text()))
    lines = (INFRA / ".env.example").read_text().splitlines()
    listed = {line.partition("=")[0] for line in lines if line.strip() and not line.startswith("#")}
    assert used == listed


def test_env_example_holds_no_password_and_git_ignores_the_real_env():
    lines = (INFRA / ".env.example").read_text().splitlines()
    assert all(line.partition("=")[2] == "" for line in lines if "PASSWORD=" in line)
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def test_mlflow_keeps_runs_in_postgres_and_serves_artifacts_from_minio():
    services = load("docker-compose.yml")["services"]
    mlflow = services["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    command = mlflow["command"].split()
    assert command[:2] == ["mlflow", "server"] and "--serve-artifacts" in command
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    assert mlflow["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                    "minio-init": {"condition": "service_completed_successfully"}}
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert all("healthcheck" in services[name] for name in ("postgres", "minio", "mlflow"))


# --- the image -----------------------------------------------------------------------------------


def test_dockerfile_installs_the_project_on_the_readmes_torch():
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    readme_torch = re.search(r"pip install torch==([\d.]+)", (ROOT / "README.md").read_text()).group(1)
    assert arg_default("TORCH_VERSION") == readme_torch
    runs = [arguments for kind, arguments in instructions if kind == "RUN"]
    torch_at = next(i for i, run in enumerate(runs) if 'torch==${TORCH_VERSION}' in run)
    project_at = next(i for i, run in enumerate(runs) if re.search(r"pip install \.( |$)", run))
    assert torch_at < project_at  # the pinned torch first, or the project's dependencies choose one


def test_dockerfile_entry_point_is_the_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = next(json.loads(arguments) for kind, arguments in dockerfile() if kind == "ENTRYPOINT")
    assert entry[0] in scripts


def test_dockerfile_copies_every_source_folder_and_no_credentials():
    copied = [arguments.split()[:-1] for kind, arguments in dockerfile() if kind in ("COPY", "ADD")]
    sources = [s.rstrip("/") for paths in copied for s in paths if not s.startswith("--")]
    # The whole context (".") would carry infra/.env and whatever keys lie in the checkout.
    assert "." not in sources
    assert not [s for s in sources if re.search(r"\.env|\.pem$|\.key$|id_rsa|auth_token|\.aws", s)]
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(package_dirs.values()) | {"pyproject.toml", "README.md"} <= set(sources)
