"""Paths and run profiles: Kaggle layout when present, else parameters, else environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

KAGGLE_INPUT = Path("/kaggle/input/rsna-2022-cervical-spine-fracture-detection")
KAGGLE_WORKING = Path("/kaggle/working")
DATA_ENV, WORK_ENV = "RSNA_DATA_DIR", "RSNA_WORK_DIR"


@dataclass(frozen=True)
class Profile:
    """How big a run is: the cached image size and, for `make run`, the synthetic dataset it makes (its size and how
    hard its fractures are to see).

    smoke: tests, seconds. demo: the default of `make run`, minutes on 2 CPU cores.
    bench: benchmark quality and speed. full: real data on a GPU.
    """

    name: str
    image_size: int
    synthetic_train: int
    synthetic_test: int
    synthetic_size: int
    compress_cache: bool = False
    workers: int = 2
    synthetic_difficulty: float = 0.5  # 0: wide displaced fractures, 1: hairline (`dev.synthetic`)


PROFILES = {
    "smoke": Profile("smoke", image_size=64, synthetic_train=12, synthetic_test=4, synthetic_size=64),
    "demo": Profile("demo", image_size=96, synthetic_train=120, synthetic_test=32, synthetic_size=96,
                    synthetic_difficulty=0.0),
    "bench": Profile("bench", image_size=128, synthetic_train=240, synthetic_test=40, synthetic_size=128),
    "full": Profile("full", image_size=256, synthetic_train=40, synthetic_test=10, synthetic_size=512,
                    compress_cache=True, workers=os.cpu_count() or 2),
}


def get_profile(name: str) -> Profile:
    """The profile called `name`; a ValueError lists the valid names."""
    if name not in PROFILES:
        raise ValueError(f"PROFILE must be one of {sorted(PROFILES)}, got {name!r}")
    return PROFILES[name]


def on_kaggle() -> bool:
    return KAGGLE_INPUT.is_dir()


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The competition data folder: the argument, else $RSNA_DATA_DIR, else the Kaggle input folder."""
    value = data_dir or os.environ.get(DATA_ENV) or (str(KAGGLE_INPUT) if on_kaggle() else "")
    if not value:
        raise ValueError(f"No data folder: set the notebook parameter DATA_DIR, pass DATA_DIR=... to make run, "
                         f"or export {DATA_ENV}=/path/to/rsna-2022-cervical-spine-fracture-detection")
    path = Path(value).expanduser()
    if not (path / "test.csv").exists() and not (path / "train.csv").exists():
        raise FileNotFoundError(f"{path} holds neither train.csv nor test.csv: DATA_DIR must be the competition "
                                f"folder (train.csv, test.csv, train_images/, test_images/, segmentations/)")
    return path


def resolve_work_dir(work_dir: str | os.PathLike | None = None) -> Path:
    """Where outputs go: the argument, else $RSNA_WORK_DIR, else /kaggle/working on Kaggle, else ./work."""
    value = work_dir or os.environ.get(WORK_ENV) or (str(KAGGLE_WORKING) if KAGGLE_WORKING.is_dir() else "work")
    path = Path(value).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
