"""The work folder: every path under WORK_DIR named once (`WorkLayout`), and one way to write any file atomically.

    WORK_DIR/
      cache/<spec key>/<uid>.npz          windowed slices of every study (notebook 01)
      preprocess_summary.csv              one row per study: status, files, warnings
      localisation/vertebrae.csv          ranges and boxes of C1..C7 per study (notebook 02)
      localisation/masks/<uid>.npz        vertebra labels on the cache grid
      localisation/localisation.json      settings, folds and range source, for inference
      localisation/models/                the slice classifiers, BiGRUs and 3D UNets
      inputs/<key>/<split>/<uid>.npy      each fracture model's input of each study, built once
      models/fracture/, models/vit/       the fracture models' fold checkpoints (notebooks 03, 04)
      predictions/<name>_oof.csv, _test.csv, <name>.json   each model's predictions and settings
      predictions/ensemble.json           the blend notebook 05 chose; everything inference needs besides weights
      submission.csv

A write goes to `.<name>.<pid>.tmp` beside the file, then `os.replace`: a killed run leaves at most a temp file,
never half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


def temp_path(path: Path) -> Path:
    """Where a write of `path` goes first: `.<name>.<pid>.tmp` beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temp path to write; on success it replaces `path` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    write_bytes(path, json.dumps(obj, indent=1, default=str).encode())


def write_csv(path: str | os.PathLike, df: pd.DataFrame, index: bool = False) -> None:
    with atomic_file(path) as tmp:
        df.to_csv(tmp, index=index)


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class WorkLayout:
    """The paths of one work folder (see the module docstring for the tree)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def derived(self) -> tuple[Path, ...]:
        """Everything made from the data (cache entries are named by study uid alone): stale once the data change."""
        return (self.cache, self.preprocess_summary, self.localisation, self.root / "inputs", self.root / "models",
                self.predictions)

    @property
    def preprocess_summary(self) -> Path:
        return self.root / "preprocess_summary.csv"

    @property
    def localisation(self) -> Path:
        return self.root / "localisation"

    @property
    def vertebrae(self) -> Path:
        return self.localisation / "vertebrae.csv"

    @property
    def masks(self) -> Path:
        return self.localisation / "masks"

    def mask(self, uid: str) -> Path:
        return self.masks / f"{uid}.npz"

    @property
    def localisation_meta(self) -> Path:
        return self.localisation / "localisation.json"

    @property
    def localisation_models(self) -> Path:
        return self.localisation / "models"

    def inputs(self, key: str, split: str) -> Path:
        return self.root / "inputs" / key / split

    def models(self, family: str) -> Path:
        """Checkpoints of one family of models: "fracture" (notebook 03) or "vit" (notebook 04)."""
        return self.root / "models" / family

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def prediction(self, name: str, part: str) -> Path:
        """`part`: "oof" or "test"."""
        return self.predictions / f"{name}_{part}.csv"

    def model_meta(self, name: str) -> Path:
        return self.predictions / f"{name}.json"

    @property
    def ensemble_meta(self) -> Path:
        return self.predictions / "ensemble.json"

    @property
    def ensemble_table(self) -> Path:
        return self.predictions / "ensemble_table.csv"

    @property
    def inference_timing(self) -> Path:
        return self.predictions / "inference_timing.json"

    @property
    def test_boxes(self) -> Path:
        return self.predictions / "test_boxes.csv"

    @property
    def oof_prior(self) -> Path:
        return self.root / "oof_prior.csv"

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv"

    @property
    def previous_submission(self) -> Path:
        return self.root / "previous_submission.csv"

    @property
    def run_summary(self) -> Path:
        return self.root / "run_summary.json"


def layout_of(work_dir: str | os.PathLike | WorkLayout) -> WorkLayout:
    return work_dir if isinstance(work_dir, WorkLayout) else WorkLayout(Path(work_dir))
