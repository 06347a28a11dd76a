"""Fracture detection quality and time (notebook 03's models) on a profile's synthetic dataset.

Competition metric of both CNN + BiLSTM forms out of fold against the prior baseline, per-vertebra AUC, the Grad-CAM
box hit rate, training and inference time per study. `--localisation truth` builds the vertebra ranges from the
synthetic ground truth (isolating the fracture model from the localiser); `predicted` runs notebook 02's pipeline.

    python -m benchmarks.fracture_quality --profile bench --localisation truth
    python -m benchmarks.fracture_quality --profile bench --forms vertebra --model resnet10t --epochs 8 --folds 2 \
        --lr 1e-3 --tag cpu_pilot     # a shorter run that fits on 2 CPU cores (about 35 minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from benchmarks.common import prepared_data, write_result
from kernel_utils.baseline import cross_validate_prior, make_folds
from kernel_utils.cache import iter_cached, profile_cache_spec
from kernel_utils.fracture import (
    FractureSettings,
    build_inputs,
    cross_validate_fracture,
    in_channels,
    load_fold_models,
    predict_fracture,
)
from kernel_utils.fracture_data import slice_targets_of
from kernel_utils.gradcam import boxes_for_studies, score_boxes
from kernel_utils.localisation import (
    LocalisationSettings,
    best_range_source,
    cross_validate,
    load_localisation_models,
    localise_all,
    localise_study,
    write_localisation,
)
from kernel_utils.metric import VERTEBRAE, competition_loss
from kernel_utils.windowing import resize_slices


def truth_localisation(data_dir, work_dir, spec) -> None:
    """vertebrae.csv and masks from the synthetic ground truth labels (resized to the cache grid)."""
    rows = []
    for split, uid, entry in iter_cached(data_dir, work_dir, spec):
        labels = np.load(data_dir / "_truth" / f"{uid}.npz")["labels"]
        labels = resize_slices(np.where(labels <= 7, labels, 0).astype(np.uint8), entry["images"].shape[1],
                               nearest=True)
        study_rows, _ = localise_study(labels, np.ones(8), entry["slice_numbers"], tuple(entry["original_shape"]),
                                       None, "truth")
        rows += [{"split": split, "StudyInstanceUID": uid, **r, "no_cervical": False, "repairs": ""}
                 for r in study_rows]
        write_localisation(work_dir / "localisation" / "masks", uid, labels)
    pd.DataFrame(rows).to_csv(work_dir / "localisation" / "vertebrae.csv", index=False)


def predicted_localisation(data_dir, work_dir, spec, profile) -> None:
    settings = LocalisationSettings.for_profile(profile)
    studies = [{"uid": u, "images": e["images"], "mask": e["mask"]}
               for _, u, e in iter_cached(data_dir, work_dir, spec, ("train",), only_masked=True)]
    models_dir = work_dir / "localisation" / "models"
    cv = cross_validate(studies, settings, models_dir, progress=False)
    n = len(set(cv["folds"].values()))
    unets, slice_models = load_localisation_models(settings, models_dir, 3, n)
    localise_all(iter_cached(data_dir, work_dir, spec), unets, slice_models, cv["folds"], settings,
                 work_dir / "localisation", range_source=best_range_source(cv), progress=False)


def overridden(settings: FractureSettings, args) -> FractureSettings:
    """The profile's settings with the epochs, learning rate, folds, auxiliary slice-loss weight and `--param`
    values given on the command line."""
    params = dict(settings.cfg.params)
    if args.slice_loss is not None and settings.form == "vertebra":
        params["slice_loss"] = args.slice_loss
    for item in args.param:  # each form takes the parameters it has
        key, _, value = item.partition("=")
        if key in params:
            kind = type(params[key])
            params[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
    params = tuple(params.items())
    cfg = dataclasses.replace(settings.cfg, epochs=args.epochs or settings.cfg.epochs, lr=args.lr or settings.cfg.lr,
                              params=params)
    return dataclasses.replace(settings, cfg=cfg, n_folds=args.folds or settings.n_folds)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="bench")
    ap.add_argument("--localisation", choices=["truth", "predicted"], default="truth")
    ap.add_argument("--forms", default="vertebra,study")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="", help="backbone instead of the profile's (timm name)")
    ap.add_argument("--epochs", type=int, default=0, help="instead of the profile's")
    ap.add_argument("--folds", type=int, default=0, help="instead of the profile's")
    ap.add_argument("--lr", type=float, default=0.0, help="instead of the profile's")
    ap.add_argument("--slice-loss", type=float, default=None,
                    help="weight of the per-vertebra form's per-slice auxiliary loss instead of the profile's (0: off)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a model parameter instead of the profile's, e.g. channel=2 (repeatable)")
    ap.add_argument("--tag", default="", help="added to the result's name, e.g. cpu_pilot")
    args = ap.parse_args(argv)
    forms = args.forms.split(",")
    known = {k for form in forms for k, _ in FractureSettings.for_profile(args.profile, form).cfg.params}
    unknown = [item for item in args.param if item.partition("=")[0] not in known]
    if unknown:
        ap.error(f"--param {unknown}: no such parameter in the forms {args.forms} ({sorted(known)})")
    data_dir, work_dir = prepared_data(args.profile, workers=args.workers)
    spec = profile_cache_spec(args.profile)
    (work_dir / "localisation").mkdir(exist_ok=True)
    start = time.perf_counter()
    if args.localisation == "truth":
        truth_localisation(data_dir, work_dir, spec)
    else:
        predicted_localisation(data_dir, work_dir, spec, args.profile)
    loc_seconds = time.perf_counter() - start
    labels = pd.read_csv(data_dir / "train.csv")
    test_labels = pd.read_csv(data_dir / "_truth" / "test_labels.csv")
    _, prior = cross_validate_prior(labels, make_folds(labels))
    boxes_true = pd.read_csv(data_dir / "train_bounding_boxes.csv")
    where = "gpu" if torch.cuda.is_available() else "cpu"
    name = f"fracture_{args.profile}_{where}" + (f"_{args.tag}" if args.tag else "")
    forms = {}
    for form in args.forms.split(","):
        settings = overridden(FractureSettings.for_profile(args.profile, form, args.model), args)
        t0 = time.perf_counter()
        uids, inputs, metas = build_inputs(data_dir, work_dir, spec, settings, "train")
        t1 = time.perf_counter()
        slice_targets = slice_targets_of(uids, metas, labels, boxes_true)
        cv = cross_validate_fracture(uids, inputs, labels, settings, work_dir / f"fracture_models_{where}",
                                     progress=False, slice_targets=slice_targets)
        t2 = time.perf_counter()
        tu, ti, _ = build_inputs(data_dir, work_dir, spec, settings, "test")
        t3 = time.perf_counter()
        models = load_fold_models(settings, in_channels(settings, inputs), work_dir / f"fracture_models_{where}",
                                  len(set(cv["folds"].values())))
        test_pred = predict_fracture(models, tu, ti, settings, cv["patient_mode"])
        t4 = time.perf_counter()
        truth = labels.set_index("StudyInstanceUID").loc[uids]
        oof = cv["oof"].set_index("StudyInstanceUID").loc[uids]
        auc = {t: float(roc_auc_score(truth[t], oof[t])) for t in [*VERTEBRAE, "patient_overall"]
               if 0 < truth[t].sum() < len(truth)}
        result = {"run": settings.cfg.run_name, "model": settings.cfg.model, "params": dict(settings.cfg.params),
                  "epochs": settings.cfg.epochs, "lr": settings.cfg.lr, "folds": settings.n_folds,
                  "patient_mode": cv["patient_mode"],
                  "oof_loss": cv["scores"].loc["all"].to_dict(),
                  "oof_loss_over_prior": float(cv["scores"].loc["all", "loss_study"] / prior.loc["all", "loss_study"]),
                  "test_loss": competition_loss(
                      test_labels[test_labels.StudyInstanceUID.isin(test_pred.StudyInstanceUID)], test_pred),
                  "auc": auc, "mean_vertebra_auc": float(np.mean([auc[v] for v in VERTEBRAE if v in auc])),
                  "seconds_per_study": {"inputs": (t1 - t0) / len(uids), "train_all_folds": (t2 - t1) / len(uids),
                                        "test_inputs": (t3 - t2) / max(len(tu), 1),
                                        "test_inference_all_folds": (t4 - t3) / max(len(tu), 1)}}
        forms[form] = result
        write_result(name, {"forms": forms, "partial": True})
        if form == "vertebra" and len(boxes_true):
            truth_k = labels.set_index("StudyInstanceUID")
            predicted = boxes_for_studies(
                lambda u, models=models, folds=cv["folds"]: models[folds[u]], uids, inputs, metas,
                lambda u, t=truth_k: [k for k in range(1, 8) if t.loc[u, f"C{k}"] == 1],
                only=set(boxes_true.StudyInstanceUID))
            result["boxes_given_fractured_vertebrae"] = score_boxes(predicted, boxes_true)
        forms[form] = result
        summary = {"profile": args.profile, "localisation": args.localisation, "localisation_seconds": loc_seconds,
                   "train_studies": len(labels), "prior_oof_loss": prior.loc["all"].drop("studies").to_dict(),
                   "forms": forms, "targets": {"vertebra_oof_loss_over_prior": 0.6, "mean_vertebra_auc": 0.9}}
        write_result(name, summary)  # after each form: a crash keeps what was done
    return summary


if __name__ == "__main__":
    main()
