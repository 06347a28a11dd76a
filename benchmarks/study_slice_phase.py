"""Seed 002's slice phase on its own: how well the study form's CNN, trained on single labelled slices, finds the
fractured slices of held-out studies, before any BiLSTM sees its features.

Fold 0 of the profile's study form (the same folds, inputs and first-phase training as `cross_validate_fracture`).
Reports the slice AUC on the held-out labelled slices, as a patient score the AUC of each held-out study's
highest slice probability over its sampled slices, then the second phase on that CNN's frozen features (the
BiLSTM and head, trained as the form trains them): its validation loss beside the constant of the training
studies' prevalence, and its AUCs. `--slice-labels truth` trains and scores on the synthetic
truth's fractured slices of every study instead of `train_bounding_boxes.csv`: a ceiling no competitor has, which
tells the labels' share of the problem from the frame's.

    python -m benchmarks.study_slice_phase --profile demo --model resnet10t --lr 1e-3 --epochs 8 \
        --param rotate_shift=False --tag r10t_flips
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import ConcatDataset

from benchmarks.common import prepared_data, write_result
from benchmarks.fracture_quality import form_inputs, form_settings, overridden
from kernel_utils.folds import make_folds
from kernel_utils.io.cache import profile_cache_spec
from kernel_utils.metric import TARGETS
from kernel_utils.nets.fracture_nets import (
    SequenceOnFeatures,
    batch_loss,
    competition_bce,
    vertebra_batch_loss,
)
from kernel_utils.nets.registry import create_model
from kernel_utils.stages.fracture import (
    labelled_slices,
    sequence_phase_config,
    slice_features_of,
    slice_phase_config,
    studies_of,
)
from kernel_utils.stages.fracture_data import targets_of
from kernel_utils.stages.localisation_data import FeatureSequences
from kernel_utils.stages.stage import slice_labels_of
from kernel_utils.training import fit, load_best, predict


def truth_slice_targets(data_dir, uids: list[str], metas: list[dict], min_voxels: int = 1) -> np.ndarray:
    """1 where the synthetic truth puts at least `min_voxels` fracture voxels in a sampled slice, else 0:
    float32 [S, N] for every study."""
    out = np.zeros((len(uids), len(metas[0]["used"])), np.float32)
    for i, (uid, meta) in enumerate(zip(uids, metas, strict=True)):
        truth = np.load(data_dir / "_truth" / f"{uid}.npz")
        voxels = truth["fracture"].reshape(len(truth["fracture"]), -1).sum(1)
        per_number = dict(zip(truth["slice_numbers"].tolist(), voxels.tolist(), strict=True))
        numbers = np.asarray(meta["slice_numbers"])[meta["used"]]
        out[i] = [per_number.get(int(n), 0) >= min_voxels for n in numbers]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--slice-labels", choices=["boxes", "truth"], default="boxes")
    ap.add_argument("--model", default="")
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--folds", type=int, default=0, help="instead of the profile's (fold 0 is trained)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    data_dir, work_dir = prepared_data(args.profile)
    spec = profile_cache_spec(args.profile)
    given = argparse.Namespace(epochs=args.epochs, lr=args.lr, batch=0, folds=args.folds, model=args.model, variant="",
                               slice_loss=None, param=args.param)
    settings = overridden(form_settings(args.profile, "study"), given)
    uids, inputs, metas = form_inputs(data_dir, work_dir, spec, settings, "train")
    labels = pd.read_csv(data_dir / "train.csv")
    boxes = pd.read_csv(data_dir / "train_bounding_boxes.csv")
    if args.slice_labels == "truth":
        slice_targets, extra_slices = truth_slice_targets(data_dir, uids, metas), None
    else:
        slice_targets, extra_slices = slice_labels_of(data_dir, work_dir, spec, settings, inputs, labels, boxes,
                                                      progress=False)
    table = labels.set_index("StudyInstanceUID").loc[uids].reset_index()
    fold_of = make_folds(table, settings.n_folds).reindex(uids).to_numpy()
    tr, va = np.flatnonzero(fold_of != 0), np.flatnonzero(fold_of == 0)
    channels = settings.in_channels(inputs[0])
    image_channels = settings.image_channels(channels)
    study = create_model(settings.cfg, channels)
    cnn = study.slice_model()
    train = labelled_slices(studies_of(inputs, tr), slice_targets[tr], True, image_channels, settings.rotate_shift)
    extra = extra_slices.samples(tr, image_channels, settings.rotate_shift) if extra_slices else None
    valid = labelled_slices(studies_of(inputs, va), slice_targets[va], False, image_channels)
    cfg = dataclasses.replace(slice_phase_config(settings.cfg), stage=f"study_slice_phase_{args.slice_labels}")
    out_dir = work_dir / "study_slice_phase_models"
    resumed = any(out_dir.glob(f"{cfg.run_name}_fold0_last.pt"))  # then train_seconds is not a training time
    start = time.perf_counter()
    hist = fit(cnn, train if extra is None else ConcatDataset([train, extra]), valid, vertebra_batch_loss, cfg,
               out_dir, 0, progress=False)
    load_best(cnn, out_dir, cfg, 0)
    seconds = time.perf_counter() - start
    slice_logit = predict(cnn, valid, 64)[:, 0]
    study.encoder.freeze_backbone()  # seed 002's second phase, as `cross_validate_fracture` runs it
    feats = slice_features_of(study, inputs, 64)  # [S, N, F]: the CNN's features of every sampled slice
    with torch.no_grad():
        study_max = cnn.head.cpu()(torch.from_numpy(feats[va])).amax(dim=(1, 2)).numpy()
    targets = targets_of(table, uids)
    seq_cfg = dataclasses.replace(sequence_phase_config(settings), stage=f"{cfg.stage}_sequence",
                                  params=(*settings.cfg.params, ("slice_phase", cfg.run_name)))
    seq_hist = fit(SequenceOnFeatures(study), FeatureSequences(list(feats[tr]), list(targets[tr])),
                   FeatureSequences(list(feats[va]), list(targets[va])), batch_loss, seq_cfg, out_dir, 0,
                   progress=False)
    load_best(SequenceOnFeatures(study), out_dir, seq_cfg, 0)
    seq_logit = predict(SequenceOnFeatures(study), FeatureSequences(list(feats[va])), 64)
    seq_auc = {name: float(roc_auc_score(targets[va, k], seq_logit[:, k])) for k, name in enumerate(TARGETS)}
    prevalence = np.clip(targets[tr].mean(0), 1e-3, 1 - 1e-3)
    constant = float(competition_bce(torch.logit(torch.tensor(prevalence)).expand(len(va), 8),
                                     torch.tensor(targets[va])))
    n_extra = len(extra) if extra is not None else 0
    where = "gpu" if torch.cuda.is_available() else "cpu"
    name = f"study_slice_phase_{args.profile}_{where}" + (f"_{args.tag}" if args.tag else "")
    result = {
        "profile": args.profile,
        "slice_labels": "truth" if args.slice_labels == "truth" else settings.slice_labels,
        "run": cfg.run_name, "model": cfg.model,
        "lr": cfg.lr, "epochs": cfg.epochs, "params": dict(settings.cfg.params),
        "train_slices": len(train) + n_extra,
        "train_fractured_slices": int(train.targets.sum() + (extra.targets.sum() if extra is not None else 0)),
        "train_studies": len(tr), "valid_studies": len(va), "valid_slices": len(valid),
        "valid_fractured_slices": int(valid.targets.sum()),
        "slice_auc": float(roc_auc_score(valid.targets[:, 0], slice_logit)),
        "patient_auc_of_max_slice": float(roc_auc_score(targets[va, 7], study_max)),
        "sequence": {"valid_loss_by_epoch": seq_hist["valid_loss"].round(4).tolist(),
                     "best_valid_loss": float(seq_hist["valid_loss"].min()),
                     "train_prevalence_valid_loss": constant, "auc": seq_auc,
                     "mean_vertebra_auc": float(np.mean([seq_auc[v] for v in TARGETS[:7]]))},
        "valid_loss_by_epoch": hist["valid_loss"].round(4).tolist(),
        "train_loss_by_epoch": hist["train_loss"].round(4).tolist(), "train_seconds": seconds,
        "resumed_from_checkpoints": resumed}
    write_result(name, result)
    return result


if __name__ == "__main__":
    main()
