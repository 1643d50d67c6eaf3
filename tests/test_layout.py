"""The package layout: `platform/` never shadows the standard library, and `pip install .` ships
every module of the source folders as `archipelago.*`."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"experts": "archipelago.experts", "router": "archipelago.router", "domains": "archipelago.domains",
           "platform": "archipelago.platform"}


def source_modules() -> set[str]:
    modules = set()
    for folder, package in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            modules.add(".".join([package, *parts]).removesuffix(".__init__"))
    return modules


def test_platform_folder_is_not_a_regular_package():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_and_torch_import_from_the_repository_root():
    code = "import platform; platform.system(); import torch; print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert str(ROOT / "platform") not in out.stdout


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join([SOURCES[p.relative_to(ROOT).parts[0]], *p.relative_to(ROOT).parts[1:]])
               for folder in SOURCES for p in [ROOT / folder, *(ROOT / folder).rglob("*")]
               if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))}
    assert folders == listed


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "archipelago"
    # Build from a clean copy: a stale build/ folder in the checkout would leak old modules into the wheel.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "runs", "__pycache__",
                                                                 "mlruns", "mlflow.db"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(out)], check=True, capture_output=True)
    return next(out.glob("archipelago-*.whl"))


def test_plain_install_ships_every_module(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path)
        shipped = {name.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
                   for name in archive.namelist() if name.startswith("archipelago/") and name.endswith(".py")}
    assert shipped == source_modules()
    modules = sorted(source_modules())
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    module = importlib.import_module(name)\n"
            f"    assert (module.__file__ or '').startswith({str(tmp_path)!r}), (name, module.__file__)\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env={"PYTHONPATH": str(tmp_path)})
