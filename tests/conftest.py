"""Shared pytest fixtures; each fixture is its own section, append new ones below."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from archipelago.platform import islands
from tests.cluster import LocalCluster, two_node_cluster

TESTS_DIR = Path(__file__).resolve().parent


# --- Ray: one embedded local instance shared by the whole test session --------------------------


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """Connect this process to an embedded local Ray (2 CPUs) once; shut it down at the end.

    Workers get the tests folder on PYTHONPATH, so plain functions defined in test modules
    (pickled by reference) import there too.
    """
    pythonpath = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    islands.connect("local", runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, num_cpus=2)
    yield
    islands.disconnect()


# --- Ray: one real two-node cluster (islands "a" and "b") shared by the tests that need one ----


@pytest.fixture(scope="session")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Started once (about 30 s) for every test that needs islands on separate nodes; stopped by PID."""
    with two_node_cluster(tmp_path_factory.mktemp("two-nodes")) as cluster:
        yield cluster


# --- markers -------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """`cluster`: the test starts a real multi-node Ray cluster on this machine (slow; deselect
    with -m "not cluster")."""
    config.addinivalue_line("markers", "cluster: starts a real multi-node Ray cluster on this machine (slow)")


# --- torch threads --------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """Tests run torch on one thread: on a small shared machine (CI has 2 cores, and Ray workers run
    beside the test process) more threads oversubscribe the cores and run many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
