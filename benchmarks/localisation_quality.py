"""Vertebra localisation quality and time (issue: notebook 02), on a profile's synthetic dataset.

Per-slice accuracy of the CNN and the RandomForest (seed 000's table) and the 3D UNet's Dice per vertebra, on
held-out segmented studies by cross-validation, with the time each took.

    python -m benchmarks.localisation_quality --profile bench
    python -m benchmarks.localisation_quality --profile bench --slice-model resnet18 --epochs 2 --folds 2 \
        --seg-epochs 0 --tag cpu_pilot   # the CPU pilot of the slice models (no 3D UNet)
    python -m benchmarks.localisation_quality --profile bench --folds 2 --unet-only --tag cpu_pilot_unet
    python -m benchmarks.localisation_quality --profile bench --ceiling-only   # Dice a perfect UNet gets per cube side
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from benchmarks.common import prepared_data, write_result
from kernel_utils.io.cache import iter_cached, profile_cache_spec
from kernel_utils.stages.localisation import accuracy_table, cross_validate, range_table, segmented_studies
from kernel_utils.stages.localisation_data import best_possible_dice
from kernel_utils.stages.localisation_settings import LocalisationSettings


def dice_ceiling(studies: list[dict], size: int) -> float:
    """Mean over the studies of `best_possible_dice` at a cube side (cut from each study's roi)."""
    return round(float(np.mean([best_possible_dice(s["mask"], size, s["roi"]) for s in studies])), 4)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="bench")
    ap.add_argument("--slice-model", default="tf_efficientnetv2_b0")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--folds", type=int, default=0, help="0: the profile's")
    ap.add_argument("--epochs", type=int, default=0, help="slice CNN epochs; 0: the profile's")
    ap.add_argument("--seg-epochs", type=int, default=-1, help="3D UNet epochs; -1: the profile's; 0: not trained "
                    "(one epoch, so the run goes through; no Dice reported)")
    ap.add_argument("--seg-size", type=int, default=0, help="3D UNet cube side; 0: the profile's")
    ap.add_argument("--seg-width", type=int, default=0, help="3D UNet first-level channels; 0: the profile's")
    ap.add_argument("--seg-batch", type=int, default=0, help="3D UNet batch size; 0: the profile's")
    ap.add_argument("--seg-lr", type=float, default=0.0, help="3D UNet learning rate; 0: the profile's")
    ap.add_argument("--seg-res-units", type=int, default=-1, help="UNet residual units; -1: the profile's")
    ap.add_argument("--seg-region", default="", help="frame | bone; empty: the profile's")
    ap.add_argument("--seg-margin", type=float, default=0.0, help="bone box margin; 0: the profile's")
    ap.add_argument("--seg-affine", type=int, default=-1, help="1: random rotation, scale and shift of the cubes "
                    "besides the flip; 0: the flip only; -1: the profile's")
    ap.add_argument("--unet-only", action="store_true", help="train and score the 3D UNet alone")
    ap.add_argument("--ceiling-only", action="store_true",
                    help="no training: the mean Dice of a perfect prediction at cube sides 64, 96, 128")
    ap.add_argument("--tag", default="", help="added to the results file name")
    args = ap.parse_args(argv)
    data_dir, work_dir = prepared_data(args.profile, workers=args.workers)
    spec = profile_cache_spec(args.profile)
    settings = LocalisationSettings.for_profile(args.profile, slice_model=args.slice_model)
    changes = {"n_folds": args.folds, "slice_epochs": args.epochs, "seg_size": args.seg_size,
               "seg_width": args.seg_width, "seg_batch": args.seg_batch, "seg_lr": args.seg_lr,
               "seg_region": args.seg_region, "seg_margin": args.seg_margin}
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v})
    if args.seg_affine >= 0:
        settings = dataclasses.replace(settings, seg_affine=bool(args.seg_affine))
    if args.seg_res_units >= 0:
        settings = dataclasses.replace(settings, seg_res_units=args.seg_res_units)
    studies = segmented_studies(iter_cached(data_dir, work_dir, spec, ("train",), only_masked=True), settings,
                                spec.crop)
    if args.ceiling_only:
        return write_result(f"localisation_{args.profile}_dice_ceiling", {
            "profile": args.profile, "segmented_studies": len(studies), "image_size": spec.image_size,
            "what": "mean Dice over C1..C7 of the true mask at the cube side, brought back to the cache grid",
            "seg_region": settings.seg_region,
            "dice_ceiling": {size: dice_ceiling(studies, size) for size in sorted({64, 96, 128, settings.seg_size})}})
    if args.seg_epochs >= 0:  # 0: one epoch (the Dice of an untrained UNet is not asked); max_steps_per_epoch caps
        settings = dataclasses.replace(settings, seg_epochs=max(args.seg_epochs, 1))  # the slice models too
    where = "gpu" if torch.cuda.is_available() else "cpu"
    models_dir = work_dir / f"localisation_models_{where}"
    # a rerun resumes finished trainings from their checkpoints: its seconds are then not training times
    trained = [settings.seg_cfg] + ([] if args.unet_only else [settings.slice_cfg, settings.sequence_cfg])
    reused = sorted(p.name for cfg in trained for p in models_dir.glob(f"{cfg.run_name}_fold*_last.pt"))
    start = time.perf_counter()
    cv = cross_validate(studies, settings, models_dir, slice_models=not args.unet_only)
    dice = cv["dice"].drop(columns=["uid", "fold"]).mean()
    name = f"localisation_{args.profile}_{where}" + (f"_{args.tag}" if args.tag else "")
    result = {
        "profile": args.profile, "segmented_studies": len(studies), "image_size": spec.image_size,
        "seg_size": settings.seg_size, "folds": len(set(cv["folds"].values())),
        "seg_epochs": settings.seg_cfg.epochs, "seg_width": settings.seg_width, "seg_batch": settings.seg_batch,
        "seg_lr": settings.seg_lr,
        "seg_region": settings.seg_region, "seg_margin": settings.seg_margin,
        "seg_res_units": settings.seg_res_units, "seg_affine": settings.seg_affine,
        "dice_ceiling": dice_ceiling(studies, settings.seg_size),
        "seconds": cv["seconds"],
        "total_seconds": time.perf_counter() - start, "checkpoints_reused": reused,
        "targets": {"cnn_overall_accuracy": 0.95, "mean_dice": 0.90}}
    curves = cv["histories"][cv["histories"].model == "unet3d"]
    result["unet_curves"] = {  # per fold: has the valid loss stopped falling?
        int(k): {"epochs": len(h), "best_epoch": int(h.epoch[h.valid_loss.idxmin()]),
                 "best_valid_loss": round(float(h.valid_loss.min()), 4),
                 "last_valid_loss": round(float(h.valid_loss.iloc[-1]), 4),
                 "last_train_loss": round(float(h.train_loss.iloc[-1]), 4)}
        for k, h in curves.groupby("fold")}
    if args.unet_only:
        result["seconds"] = {"unet3d": cv["seconds"]["unet3d"]}
    else:
        result.update(slice_model=settings.slice_cfg.model, slice_epochs=settings.slice_cfg.epochs,
                      sequence_head=settings.sequence_cfg.run_name,
                      accuracy=accuracy_table(cv["slices"]).round(4).to_dict())
    ranges = range_table(cv["ranges"])
    if args.seg_epochs != 0:
        result.update(dice_per_vertebra=dice.round(4).to_dict(), mean_dice=float(dice.mean()))
    else:
        ranges = ranges.drop(index="unet3d", errors="ignore")
    result["slice_range_errors"] = ranges.round(4).to_dict(orient="index")  # held-out studies, in slices
    return write_result(name, result)


if __name__ == "__main__":
    main()
