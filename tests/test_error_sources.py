"""Every front-end settings error names where the bad value came from (issue 11): the `--set` or the
flag that wrote the key when one did, else the settings file (or --config-json), and never the file
for a value the file does not hold. Each case runs `archipelago fit --dry-run` in process: exit 2,
one line, nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from archipelago.platform.cli import main

FILE: dict[str, Any] = {"data": "sines:64", "experts": 2}
FILE_NAME = "FILE"  # stands for the settings file's path in the expected messages

# Each case: changes to the file, flags, and what the line must name, in order. A case that expects no
# FILE_NAME also checks that the file's path is absent.
CASES: dict[str, tuple[dict[str, Any], list[str], list[str]]] = {
    "the file": ({"expert": {"steps": -2}}, [], [f"{FILE_NAME}: expert.steps: Input should be greater than"]),
    "a --set": ({}, ["--set", "expert.steps=-1"], ["--set expert.steps: Input should be greater than"]),
    "a --set over the file's value": (
        {"expert": {"steps": -2}}, ["--set", "expert.steps=-1"], ["--set expert.steps: ", "(got -1)"],
    ),
    "a --set of a whole list": (
        {}, ["--set", "placement=[{island: a, gpus: 1}, {}]"], ["--set placement.0.gpus: unknown key"],
    ),
    "a --set that makes an unknown key": ({}, ["--set", "expertz.steps=3"], ["--set expertz: unknown key"]),
    "a --set of a launch key": ({}, ["--set", "island_wait_s=soon"], ["--set island_wait_s: Input should be"]),
    "a flag": ({}, ["--experts", "0"], ["--experts: Input should be greater than or equal to 1 (got 0)"]),
    "a flag over a --set": ({}, ["--set", "experts=3", "--experts", "0"], ["--experts: ", "(got 0)"]),
    "a flag and a --set": (
        {}, ["--experts", "0", "--set", "router.steps=0"], ["--experts: Input", "; --set router.steps: Input"],
    ),
    "the file and a --set": (
        {"experts": 0}, ["--set", "expert.lr=-1"], [f"{FILE_NAME}: experts: Input", "--set expert.lr: Input"],
    ),
    "a --set into domain_config": (
        {}, ["--set", "domain_config.window=1"], ["--set domain_config.window: Input should be greater than"],
    ),
    "domain_config in the file": (
        {"domain_config": {"windw": 8}}, [], [f"{FILE_NAME}: domain_config.windw: unknown key", "'timeseries'"],
    ),
    "a --set of the domain": ({}, ["--set", "domain=imagez"], ["--set domain: unknown domain 'imagez'"]),
}


def settings_file(folder: Path, changes: dict[str, Any]) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(folder / "run"), **FILE, **changes}))
    return path


def refusal(argv: list[str], folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a refused `fit --dry-run`, which writes nothing."""
    assert main(["fit", *argv, "--dry-run"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("archipelago: error: "), lines
    assert "# plan" not in captured.out
    assert not (folder / "run").exists()
    return lines[0].removeprefix("archipelago: error: ")


@pytest.mark.parametrize("case", CASES)
def test_the_error_names_where_the_bad_value_came_from(case: str, tmp_path: Path, capsys) -> None:
    changes, flags, expected = CASES[case]
    path = settings_file(tmp_path, changes)
    line = refusal([str(path), *flags], tmp_path, capsys)
    named = [part.replace(FILE_NAME, str(path)) for part in expected]
    at = [line.find(part) for part in named]
    assert -1 not in at and at == sorted(at), (line, named)
    if not any(FILE_NAME in part for part in expected):
        assert str(path) not in line, line


def test_inline_settings_are_named_as_such(tmp_path: Path, capsys) -> None:
    inline = json.dumps({"run_dir": str(tmp_path / "run"), **FILE, "experts": 0})
    line = refusal(["--config-json", inline], tmp_path, capsys)
    assert line.startswith("--config-json: experts: Input should be greater than or equal to 1"), line
