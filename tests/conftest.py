"""Shared fixtures: one tiny synthetic dataset per test session, and the real reference bytes when present."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from kernel_utils.dev.synthetic import make_dataset

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
SMOKE_ARGS = dict(n_train=12, n_test=4, size=64, seed=0, difficulty=0.5)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same torch and numpy global seeds, whatever ran before it."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory) -> Path:
    """12 train + 4 test studies at 64x64 with every quirk, in the competition layout."""
    out = tmp_path_factory.mktemp("smoke_data")
    make_dataset(str(out), workers=2, progress=False, **SMOKE_ARGS)
    return out


@pytest.fixture(scope="session")
def faulted_smoke(smoke_dir, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A copy of the smoke dataset with one of each dataset fault (`inject_data_faults`), and the list of them."""
    import shutil

    from kernel_utils.dev.fault_injection import inject_data_faults

    out = tmp_path_factory.mktemp("faulted_smoke") / "data"
    shutil.copytree(smoke_dir, out)
    return out, inject_data_faults(out)


@pytest.fixture(scope="session")
def reference() -> Path:
    """../shared/reference, or a skip saying why."""
    if not REFERENCE.is_dir():
        pytest.skip(f"real reference data not found at {REFERENCE}")
    return REFERENCE


def dicom_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))


def one_step_lowers_loss(model, x, target, evaluate_in_eval_mode: bool = False,
                         lr: float = 1e-3) -> tuple[float, float]:
    """(loss before, loss after) one AdamW step of the competition loss on a fixed batch.

    With ``evaluate_in_eval_mode`` both losses are measured in eval mode (no dropout), so the
    comparison is between the same deterministic function before and after the step; the step
    itself is taken in train mode. Seeded, so the outcome does not depend on test order.
    """
    import torch

    from kernel_utils.nets.fracture_nets import competition_bce

    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def measure() -> float:
        model.eval() if evaluate_in_eval_mode else model.train()
        with torch.no_grad():
            torch.manual_seed(1)
            return float(competition_bce(model(x), target))

    before = measure()
    model.train()
    torch.manual_seed(2)
    loss = competition_bce(model(x), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return before, measure()


os.environ.setdefault("MPLBACKEND", "Agg")
