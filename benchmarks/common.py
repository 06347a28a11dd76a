"""Shared pieces of the benchmarks: the synthetic dataset of a profile, its cache, the results file."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from kernel_utils.dev.pipeline import ensure_synthetic
from kernel_utils.io.cache import profile_cache_spec
from kernel_utils.io.cache_build import build_cache

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def prepared_data(profile: str, work_dir: Path | None = None, workers: int = 2) -> tuple[Path, Path]:
    """(data_dir, work_dir) with the profile's synthetic dataset made and its train/test cache built."""
    work_dir = work_dir or ROOT / ".data" / f"work_{profile}"
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir = ensure_synthetic(work_dir, profile)
    spec = profile_cache_spec(profile)
    for split in ("train", "test"):
        build_cache(data_dir, work_dir, split, spec, workers=workers)
    return data_dir, work_dir


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}"


def write_result(name: str, result: dict) -> Path:
    """benchmarks/results/<name>.json with the machine and the date added."""
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d"), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(result, indent=1, default=float))
    return path
