"""The Kaggle kernel's inference (`predict_test`) on real-size studies on this machine: seconds per study per stage,
peak memory, and the projection of the hidden test (about 1,500 studies) against Kaggle's 9 hours.

    python -m benchmarks.real_size_predict [--studies 3] [--profile full]

The studies are synthetic at real size (512x512, about 180-360 slices); the networks are the profile's, every fold,
with untrained weights (their speed does not depend on the weights), written as notebooks 02-05 would write them.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.common import ROOT, write_result
from kernel_utils.dev.synthetic import make_dataset
from kernel_utils.io.cache import profile_cache_spec
from kernel_utils.layout import WorkLayout, read_json
from kernel_utils.metric import TARGETS
from kernel_utils.nets import create_model
from kernel_utils.stages.fracture import save_predictions
from kernel_utils.stages.fracture_settings import StudySettings, VertebraSettings
from kernel_utils.stages.localisation_settings import LocalisationSettings
from kernel_utils.stages.vertebra_localiser import save_localisation_meta
from kernel_utils.stages.vit import ViTSettings
from kernel_utils.submit.predict import HIDDEN_TEST_STUDIES, KAGGLE_LIMIT_HOURS, predict_test, save_ensemble
from kernel_utils.training import TrainConfig, atomic_save, checkpoint_paths

DATA = ROOT / ".data" / "real_size_predict"
GPU_RECORD = ROOT / "results" / "real_size_timing_gpu.json"


def save_untrained(model: torch.nn.Module, folder: Path, cfg: TrainConfig, fold: int) -> None:
    """A fold's `_best.pt` as training writes it, with the initial weights."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": model.state_dict(), "config": cfg.to_json(), "epoch": 0, "score": float("nan")},
                checkpoint_paths(folder, cfg, fold)[0])


def untrained_work_dir(work_dir: Path, profile: str) -> list[str]:
    """Every model of a profile, every fold, untrained, with the metadata the kernel reads; returns the models."""
    layout = WorkLayout(work_dir)
    channels = len(profile_cache_spec(profile).windows)
    loc = LocalisationSettings.for_profile(profile)
    for k in range(loc.n_folds):
        save_untrained(create_model(loc.seg_cfg, channels), layout.localisation_models, loc.seg_cfg, k)
        cnn = create_model(loc.slice_cfg, channels)
        save_untrained(cnn, layout.localisation_models, loc.slice_cfg, k)
        head = create_model(loc.sequence_cfg, cnn.backbone.pooled_features)
        save_untrained(head, layout.localisation_models, loc.sequence_cfg, k)
    save_localisation_meta(layout, loc, loc.n_folds)
    names = []
    vertebra, vit = VertebraSettings.for_profile(profile), ViTSettings.for_profile(profile)
    for settings, in_channels in ((vertebra, 2 * vertebra.context + 2),  # the neighbours and the mask
                                  (StudySettings.for_profile(profile), channels),
                                  (vit, channels + vit.mask_channel)):
        for k in range(settings.n_folds):
            save_untrained(create_model(settings.cfg, in_channels), layout.models(settings.family), settings.cfg, k)
        save_predictions(layout, settings, pd.DataFrame(), pd.DataFrame(),
                         {"patient_mode": settings.patient_modes[0], "n_folds": settings.n_folds})
        names.append(settings.name)
    weights = np.full((len(TARGETS), len(names)), 1 / len(names))
    save_ensemble(layout, names, weights, "blend_shared", dict.fromkeys(TARGETS, 0.2), profile_cache_spec(profile))
    return names


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--profile", default="full")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)
    data_dir, work_dir = DATA / f"data_{args.studies}", DATA / "work"
    if not (data_dir / "test.csv").exists():
        make_dataset(str(data_dir), n_train=1, n_test=args.studies, size=512, seed=1)
    shutil.rmtree(work_dir, ignore_errors=True)
    names = untrained_work_dir(work_dir, args.profile)
    start = time.perf_counter()
    predict_test(data_dir, work_dir, all_models=True)
    seconds = time.perf_counter() - start
    timing = read_json(WorkLayout(work_dir).inference_timing)
    per_study = timing["per_study_seconds"]
    slices = [len(list(p.glob("*.dcm"))) for p in (data_dir / "test_images").iterdir()]
    hours = HIDDEN_TEST_STUDIES * sum(row["total"] for row in per_study.values()) / 3600
    gpu = json.loads(GPU_RECORD.read_text())["hidden_test_projection"] if GPU_RECORD.exists() else None
    write_result(f"real_size_predict_{args.tag}", {
        "profile": args.profile, "models": names, "folds": {n: read_json(WorkLayout(work_dir).model_meta(n))["n_folds"]
                                                            for n in names},
        "studies": args.studies, "slices_per_study": slices, "torch_threads": torch.get_num_threads(),
        "seconds_per_study": per_study, "data_share": timing["data_share"], "seconds_all": seconds,
        "peak_rss_mb": {"kernel": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "cache_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024},
        "hidden_test_projection": {"studies": HIDDEN_TEST_STUDIES, "hours_here": hours,
                                   "limit_hours": KAGGLE_LIMIT_HOURS, "gpu_record": gpu}})


if __name__ == "__main__":
    main()
