"""Shared fixtures: one tiny synthetic dataset per test session, and the real reference bytes when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kernel_utils.synthetic import make_dataset

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
SMOKE_ARGS = dict(n_train=12, n_test=4, size=64, seed=0, difficulty=0.5)


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory) -> Path:
    """12 train + 4 test studies at 64x64 with every quirk, in the competition layout."""
    out = tmp_path_factory.mktemp("smoke_data")
    make_dataset(str(out), workers=2, progress=False, **SMOKE_ARGS)
    return out


@pytest.fixture(scope="session")
def reference() -> Path:
    """../shared/reference, or a skip saying why."""
    if not REFERENCE.is_dir():
        pytest.skip(f"real reference data not found at {REFERENCE}")
    return REFERENCE


def dicom_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))


os.environ.setdefault("MPLBACKEND", "Agg")
