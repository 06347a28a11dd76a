"""Fracture detection quality and time (notebooks 03 and 04's models, and 05's blend) on a profile's synthetic dataset.

Competition metric of both CNN + BiLSTM forms and the 3D ViT out of fold against the prior baseline, per-vertebra AUC,
the Grad-CAM box hit rate, training and inference time per study. `--localisation truth` builds the vertebra ranges
from the synthetic ground truth (isolating the fracture model from the localiser); `predicted` runs notebook 02's
pipeline. Every form's predictions are kept (`fracture_runs_<cpu|gpu>/predictions/`, the newest run of each form),
and notebook 05's comparison of them with the prior and their blend (seed 004's table) is reported each run.

    python -m benchmarks.fracture_quality --profile bench --localisation truth
    python -m benchmarks.fracture_quality --profile bench --forms vertebra --model resnet10t --epochs 8 --folds 2 \
        --lr 1e-3 --tag cpu_pilot     # a shorter run that fits on 2 CPU cores (about 35 minutes)
    python -m benchmarks.fracture_quality --profile bench --forms vit --epochs 20 --folds 2 \
        --param hidden=192 --param layers=4 --param heads=4 --tag cpu_pilot_vit   # a smaller ViT for 2 CPU cores
    ... --forms vertebra --model efficientnet_b0 --variant efficientnet_b0   # a second backbone for the blend
    ... --ensemble-only --tag cpu_pilot_ensemble   # the comparison of the stored predictions alone
    ... --fresh-test 200    # also score the fold models on 200 new studies (a rerun resumes from the checkpoints)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from benchmarks.common import prepared_data, write_result
from kernel_utils.blend.ensemble import ensemble_with_prior, load_predictions
from kernel_utils.blend.prior import cross_validate_prior, fit_prior, predict_constant
from kernel_utils.explain.gradcam import boxes_for_studies, score_boxes
from kernel_utils.folds import make_folds
from kernel_utils.io.cache import iter_cached, profile_cache_spec
from kernel_utils.io.windowing import resize_slices
from kernel_utils.layout import WorkLayout, write_csv
from kernel_utils.metric import NORMALIZATIONS, TARGETS, VERTEBRAE, competition_loss
from kernel_utils.stages.fracture import cross_validate_fracture, load_fold_models, predict_fracture, save_predictions
from kernel_utils.stages.inputs import build_inputs
from kernel_utils.stages.localisation import best_range_source, cross_validate
from kernel_utils.stages.localisation_settings import LocalisationSettings
from kernel_utils.stages.stage import FORMS, slice_labels_of
from kernel_utils.stages.vertebra_localiser import (
    load_localisation_models,
    localise_all,
    localise_study,
    write_localisation,
)
from kernel_utils.training import stored_data_key


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
        write_localisation(WorkLayout(work_dir).masks, uid, labels)
    write_csv(WorkLayout(work_dir).vertebrae, pd.DataFrame(rows))


def predicted_localisation(data_dir, work_dir, spec, profile) -> None:
    settings = LocalisationSettings.for_profile(profile)
    studies = [{"uid": u, "images": e["images"], "mask": e["mask"]}
               for _, u, e in iter_cached(data_dir, work_dir, spec, ("train",), only_masked=True)]
    models_dir = WorkLayout(work_dir).localisation_models
    cv = cross_validate(studies, settings, models_dir, progress=False)
    n = len(set(cv["folds"].values()))
    unets, slice_models = load_localisation_models(settings, models_dir, 3, n)
    localise_all(iter_cached(data_dir, work_dir, spec), unets, slice_models, cv["folds"], settings,
                 work_dir, range_source=best_range_source(cv), progress=False)


def form_settings(profile: str, form: str):
    """The profile's settings of a CNN + BiLSTM form ("vertebra", "study") or of the ViT ("vit")."""
    return FORMS[form].for_profile(profile)


def form_inputs(data_dir, work_dir, spec, settings, split):
    """(uids, inputs read study by study, metas) of a split."""
    inputs = build_inputs(data_dir, work_dir, spec, settings, split, progress=False)
    return inputs.uids, inputs, inputs.metas


def _parsed(value: str, like):
    """A command-line value as the type of the profile's value (tuples as comma-separated numbers)."""
    if isinstance(like, bool):
        return value.lower() in ("1", "true")
    if isinstance(like, tuple):
        return tuple(type(like[0])(v) for v in value.split(",") if v)  # "" is the empty tuple
    return type(like)(value)


def fresh_test_data(profile: str, n: int, spec, workers: int) -> tuple[Path, Path]:
    """(data_dir, work_dir) of `n` new test studies of the profile's distribution (seed 11, not the bench set's 0),
    cached and localised from their truth: a larger held-out set than the profile's test split."""
    from benchmarks.common import ROOT
    from kernel_utils.dev.synthetic import PROFILE_SIZES, make_dataset
    from kernel_utils.io.cache_build import build_cache

    work_dir = ROOT / ".data" / f"fresh_{profile}_{n}"
    data_dir = work_dir / "synthetic"
    if not (data_dir / "_truth" / "dataset.json").exists():
        partial = work_dir / ".synthetic.partial"
        make_dataset(str(partial), n_train=0, n_test=n, size=PROFILE_SIZES[profile][2], seed=11, workers=workers)
        partial.rename(data_dir)
    build_cache(data_dir, work_dir, "test", spec, workers=workers)
    truth_localisation(data_dir, work_dir, spec)
    return data_dir, work_dir


def aucs(truth: pd.DataFrame, pred: pd.DataFrame) -> dict[str, float]:
    """ROC AUC of every target with both classes present; truth and pred wide tables."""
    pred = pred.set_index("StudyInstanceUID").loc[truth.StudyInstanceUID]
    truth = truth.set_index("StudyInstanceUID")
    return {t: float(roc_auc_score(truth[t], pred[t])) for t in [*VERTEBRAE, "patient_overall"]
            if 0 < truth[t].sum() < len(truth)}


def fresh_test_scores(models, settings, patient_mode: str, fresh, spec, prior_values: dict) -> dict:
    """The fold models' mean on the fresh studies: loss, the prior's loss there, AUCs."""
    data_dir, work_dir = fresh
    uids, inputs, _ = form_inputs(data_dir, work_dir, spec, settings, "test")
    pred = predict_fracture(models, uids, inputs, settings, patient_mode)
    truth = pd.read_csv(data_dir / "_truth" / "test_labels.csv").set_index("StudyInstanceUID").loc[uids].reset_index()
    auc = aucs(truth, pred)
    return {"studies": len(uids), "fractured": int(truth.patient_overall.sum()), "loss": competition_loss(truth, pred),
            "prior_loss": competition_loss(truth, predict_constant(prior_values, uids)), "auc": auc,
            "mean_vertebra_auc": float(np.mean([auc[v] for v in VERTEBRAE if v in auc]))}


def ensemble_section(labels: pd.DataFrame, test_labels: pd.DataFrame, runs_dir, n_folds: int) -> dict:
    """Notebook 05's comparison of every stored form's out-of-fold predictions with the prior and their blend, and
    the test loss of each row (the blend with the weights fitted on all out-of-fold predictions)."""
    models = load_predictions(runs_dir)
    if not models:
        return {}
    oof_prior, _ = cross_validate_prior(labels, make_folds(labels, n_folds))
    chosen = ensemble_with_prior(labels, models, oof_prior, fit_prior(labels), n_folds)
    tests = {n: t for n, (_, t) in models.items()} | {"prior": chosen.test.assign(**fit_prior(labels))}
    truth = test_labels[test_labels.StudyInstanceUID.isin(chosen.test.StudyInstanceUID)]
    test_loss = {n: competition_loss(truth, t[t.StudyInstanceUID.isin(truth.StudyInstanceUID)])
                 for n, t in tests.items()}
    test_loss[f"chosen: {chosen.choice}" + (" + calibration" if chosen.calibration is not None else "")] = \
        competition_loss(truth, chosen.test)
    runs = {n: json.loads(WorkLayout(runs_dir).model_meta(n).read_text()).get("run_name")
            for n in models}
    calibration = None if chosen.calibration is None else dict(zip(TARGETS, chosen.calibration.round(3).tolist(),
                                                                     strict=True))
    return {"runs": runs, "choice": chosen.choice, "calibration_1_over_t_and_shift": calibration,
            "oof_loss": {row: {n: float(chosen.table.loc[row, f"loss_{n}"]) for n in NORMALIZATIONS}
                         for row in chosen.table.index},
            "weights": {t: dict(zip(chosen.names, w.round(2).tolist(), strict=True))
                        for t, w in zip(TARGETS, chosen.weights, strict=True)},
            "test_loss": test_loss, "test_studies": len(truth)}


def overridden(settings, args):
    """The profile's settings with the epochs, learning rate, batch size, folds, backbone, auxiliary slice-loss
    weight, variant and `--param` values given on the command line (each form takes the fields it has)."""
    fields = {f.name for f in dataclasses.fields(settings)}
    given = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch, "n_folds": args.folds,
             "model": args.model if settings.form != "vit" else 0, "variant": args.variant,
             "slice_loss": args.slice_loss if args.slice_loss is not None else 0}
    changes = {k: v for k, v in given.items() if v and k in fields}
    if args.slice_loss == 0 and "slice_loss" in fields:
        changes["slice_loss"] = 0.0
    for item in args.param:
        key, _, value = item.partition("=")
        if key in fields:
            changes[key] = _parsed(value, getattr(settings, key))
    return dataclasses.replace(settings, **changes)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="bench")
    ap.add_argument("--localisation", choices=["truth", "predicted"], default="truth")
    ap.add_argument("--forms", default="vertebra,study,vit")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="", help="CNN backbone instead of the profile's (timm name; not the ViT)")
    ap.add_argument("--epochs", type=int, default=0, help="instead of the profile's")
    ap.add_argument("--folds", type=int, default=0, help="instead of the profile's")
    ap.add_argument("--lr", type=float, default=0.0, help="instead of the profile's")
    ap.add_argument("--batch", type=int, default=0, help="batch size instead of the profile's")
    ap.add_argument("--slice-loss", type=float, default=None,
                    help="weight of the per-vertebra form's per-slice auxiliary loss instead of the profile's (0: off)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a model parameter instead of the profile's, e.g. channel=2 (repeatable)")
    ap.add_argument("--variant", default="", help="names this run's predictions apart from the form's main model, "
                    "e.g. the backbone of a second per-vertebra model for the blend")
    ap.add_argument("--ensemble-only", action="store_true",
                    help="train nothing: notebook 05's comparison of the stored predictions (every form's newest run)")
    ap.add_argument("--tag", default="", help="added to the result's name, e.g. cpu_pilot")
    ap.add_argument("--fresh-test", type=int, default=0, metavar="N",
                    help="also score every form on N new studies of the profile's distribution (the test split is "
                         "small: 40 studies in bench)")
    args = ap.parse_args(argv)
    forms = args.forms.split(",")
    known = {f.name for form in forms for f in dataclasses.fields(form_settings(args.profile, form))}
    unknown = [item for item in args.param if item.partition("=")[0] not in known]
    if unknown:
        ap.error(f"--param {unknown}: no such parameter in the forms {args.forms} ({sorted(known)})")
    data_dir, work_dir = prepared_data(args.profile, workers=args.workers)
    spec = profile_cache_spec(args.profile)
    start = time.perf_counter()
    if args.ensemble_only:
        pass  # the stored predictions were made on the localisation of their own runs
    elif args.localisation == "truth":
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
    runs_dir = work_dir / f"fracture_runs_{where}"
    fresh = fresh_test_data(args.profile, args.fresh_test, spec, args.workers) if args.fresh_test else None
    forms = {}
    summary = {"profile": args.profile, "train_studies": len(labels), "forms": forms,
               "prior_oof_loss": prior.loc["all"].drop("studies").to_dict()}
    for form in [] if args.ensemble_only else args.forms.split(","):
        settings = overridden(form_settings(args.profile, form), args)
        t0 = time.perf_counter()
        uids, inputs, metas = form_inputs(data_dir, work_dir, spec, settings, "train")
        t1 = time.perf_counter()
        wants_slices = settings.slices_first or settings.slice_loss > 0
        slice_targets, extra = slice_labels_of(data_dir, work_dir, spec, settings, inputs, labels, boxes_true,
                                               progress=False) if wants_slices else (None, None)
        before = [stored_data_key(p) for p in
                  (work_dir / f"fracture_models_{where}").glob(f"{settings.cfg.run_name}_fold*_last.pt")]
        cv = cross_validate_fracture(uids, inputs, labels, settings, work_dir / f"fracture_models_{where}",
                                     progress=False, slice_targets=slice_targets, extra_slices=extra)
        resumed = cv["data_key"] in before  # a checkpoint of other data trained again
        t2 = time.perf_counter()
        tu, ti, _ = form_inputs(data_dir, work_dir, spec, settings, "test")
        t3 = time.perf_counter()
        models = load_fold_models(settings, settings.in_channels(inputs[0]), work_dir / f"fracture_models_{where}",
                                  len(set(cv["folds"].values())))
        test_pred = predict_fracture(models, tu, ti, settings, cv["patient_mode"])
        t4 = time.perf_counter()
        save_predictions(runs_dir, settings, cv["oof"], test_pred, {"patient_mode": cv["patient_mode"],
                                                                   "n_folds": len(models), "tag": args.tag})
        auc = aucs(labels.set_index("StudyInstanceUID").loc[uids].reset_index(), cv["oof"])
        result = {"run": settings.cfg.run_name, "model": settings.cfg.model, "params": dict(settings.cfg.params),
                  "epochs": settings.cfg.epochs, "lr": settings.cfg.lr, "folds": settings.n_folds,
                  "patient_mode": cv["patient_mode"],
                  "oof_loss": cv["scores"].loc["all"].to_dict(),
                  "oof_loss_over_prior": float(cv["scores"].loc["all", "loss_study"] / prior.loc["all", "loss_study"]),
                  "test_loss": competition_loss(
                      test_labels[test_labels.StudyInstanceUID.isin(test_pred.StudyInstanceUID)], test_pred),
                  "auc": auc, "mean_vertebra_auc": float(np.mean([auc[v] for v in VERTEBRAE if v in auc])),
                  "resumed_from_checkpoints": resumed,  # then train_all_folds is not a training time
                  "seconds_per_study": {"inputs": (t1 - t0) / len(uids), "train_all_folds": (t2 - t1) / len(uids),
                                        "test_inputs": (t3 - t2) / max(len(tu), 1),
                                        "test_inference_all_folds": (t4 - t3) / max(len(tu), 1)}}
        if fresh is not None:
            result["fresh_test"] = fresh_test_scores(models, settings, cv["patient_mode"], fresh, spec,
                                                     fit_prior(labels))
        key = settings.name.removeprefix("cnn_lstm_") if args.variant else form
        forms[key] = result
        write_result(name, {"forms": forms, "partial": True})
        if form == "vertebra" and len(boxes_true):
            truth_k = labels.set_index("StudyInstanceUID")
            predicted = boxes_for_studies(
                lambda u, models=models, folds=cv["folds"]: models[folds[u]], uids, inputs, metas,
                lambda u, t=truth_k: [k for k in range(1, 8) if t.loc[u, f"C{k}"] == 1],
                only=set(boxes_true.StudyInstanceUID))
            result["boxes_given_fractured_vertebrae"] = score_boxes(predicted, boxes_true)
        forms[key] = result
        summary = {"profile": args.profile, "localisation": args.localisation, "localisation_seconds": loc_seconds,
                   "train_studies": len(labels), "prior_oof_loss": prior.loc["all"].drop("studies").to_dict(),
                   "prior_test_loss": competition_loss(test_labels, predict_constant(fit_prior(labels),
                                                                                     test_labels.StudyInstanceUID)),
                   "forms": forms, "targets": {"vertebra_oof_loss_over_prior": 0.6, "mean_vertebra_auc": 0.9,
                                               "vit_oof_loss_over_prior": 1.0, "blend_below_best_single": True}}
        write_result(name, summary)  # after each form: a crash keeps what was done
    summary["ensemble"] = ensemble_section(labels, test_labels, runs_dir, 5)
    write_result(name, summary)
    return summary


if __name__ == "__main__":
    main()
