"""Where the tests find the shared crystal data sets (CDVAE's perov_5 splits), and a skip when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

CRYSTALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "crystals"
PEROV_DEV = CRYSTALS / "perov_5_dev"


def needs_perov() -> None:
    """Skip the calling test when the shared perov_5_dev split is not on this machine."""
    if not (PEROV_DEV / "train.csv").is_file():
        pytest.skip(f"shared data set absent: {PEROV_DEV}")
