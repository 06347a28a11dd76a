"""The ensemble out of fold against the best single model, and end-to-end inference time per test study.

Runs the five notebooks of a profile on its synthetic dataset through papermill (once: a WORK_DIR that already
holds `predictions/ensemble.json` is reused), then the Kaggle kernel's inference-only chain
(`kernel_utils.submit.predict.predict_test`, every model run even when the blend leaves it out) on the test studies
with their cache entries removed first, so loading is timed too. Each stage's time is split into data (reading DICOM,
windowing, reading and cropping the cache) and models (loading weights, running networks).

    python -m benchmarks.ensemble_inference --profile demo [--work-dir DIR] [--rerun]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.common import ROOT, write_result
from kernel_utils.blend.ensemble import BLEND_ROWS, CALIBRATED, MEAN_ROW
from kernel_utils.config import get_profile
from kernel_utils.dev.pipeline import ensure_synthetic, run
from kernel_utils.io.cache import cache_dir
from kernel_utils.layout import WorkLayout, read_json
from kernel_utils.submit.predict import (
    HIDDEN_TEST_STUDIES,
    KAGGLE_LIMIT_HOURS,
    ensemble_cache_spec,
    predict_test,
)

BLENDS = (MEAN_ROW, *BLEND_ROWS)


def ensemble_figures(work_dir: Path) -> dict:
    """Out-of-fold competition loss of every row of notebook 05's table, the chosen blend and the best model."""
    table = pd.read_csv(WorkLayout(work_dir).ensemble_table, index_col="model")
    meta = read_json(WorkLayout(work_dir).ensemble_meta)
    singles = table.drop(index=[i for i in table.index if i in BLENDS or i.endswith(CALIBRATED)])
    best = singles.loss_study.idxmin()
    blends = [row for row in BLEND_ROWS if row in table.index]
    blend_row = min(blends, key=lambda row: table.loss_study[row]) if blends else best  # the better weight search
    calibrated = meta.get("calibration") is not None
    submitted = meta["choice"] + CALIBRATED if calibrated else meta["choice"]
    return {"table_loss_study": table.loss_study.to_dict(), "best_single_model": best,
            "best_single_loss_study": float(table.loss_study[best]),
            "weighted_blend": blend_row, "weighted_blend_loss_study": float(table.loss_study[blend_row]),
            "blend_over_best_single": float(table.loss_study[blend_row] / table.loss_study[best]),
            "submission_uses": meta["choice"], "calibrated": calibrated,
            "submitted_loss_study": float(table.loss_study[submitted]),
            "submitted_over_best_single": float(table.loss_study[submitted] / table.loss_study[best])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--rerun", action="store_true", help="run the notebooks again even when WORK_DIR holds them")
    args = ap.parse_args(argv)
    profile = get_profile(args.profile)
    work_dir = Path(args.work_dir or ROOT / ".data" / f"pipeline_{profile.name}")
    work_dir.mkdir(parents=True, exist_ok=True)
    pipeline_seconds = None
    if args.rerun or not WorkLayout(work_dir).ensemble_meta.exists():
        start = time.perf_counter()
        run(None, work_dir, profile.name)
        pipeline_seconds = time.perf_counter() - start
    data_dir = ensure_synthetic(work_dir, profile.name)
    meta = read_json(WorkLayout(work_dir).ensemble_meta)
    folder = cache_dir(work_dir, ensemble_cache_spec(meta))
    for study in (data_dir / "test_images").iterdir():  # time loading too: the kernel starts with no cache
        (folder / f"{study.name}.npz").unlink(missing_ok=True)
    predict_test(data_dir, work_dir, work_dir / "benchmark_submission.csv", workers=profile.workers, all_models=True)
    timing = read_json(WorkLayout(work_dir).inference_timing)
    per_study = sum(stage["total"] for stage in timing["per_study_seconds"].values())
    where = "gpu" if torch.cuda.is_available() else "cpu"
    result = {"profile": profile.name, "pipeline_seconds": pipeline_seconds, "ensemble": ensemble_figures(work_dir),
              "inference": {**timing, "seconds_per_study": per_study,
                            "hidden_test_hours": HIDDEN_TEST_STUDIES * per_study / 3600,
                            "limit_hours": KAGGLE_LIMIT_HOURS},
              "targets": {"blend_over_best_single": "< 1", "data_share": "<= 0.5"}}
    write_result(f"ensemble_inference_{profile.name}_{where}", result)
    return result


if __name__ == "__main__":
    main()
