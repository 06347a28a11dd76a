"""Cross-validated training and prediction of a study-level fracture model, for every form of the stage contract
(`stages/stage.py`): the CNN + BiLSTM forms of notebook 03 and the ViT of notebook 04. What differs between forms
is asked of their settings (`trains_on_vertebrae`, `slices_first`, `vertebra_block`, `patient_modes`), never of
their names.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset

from kernel_utils.folds import make_folds
from kernel_utils.layout import layout_of, write_csv, write_json
from kernel_utils.metric import NORMALIZATIONS, TARGETS, competition_loss
from kernel_utils.nets import create_model
from kernel_utils.nets.fracture_nets import (
    SequenceOnFeatures,
    batch_loss,
    vertebra_batch_loss,
    vertebra_bce,
    vertebra_slice_loss,
)
from kernel_utils.stages.fracture_data import FractureDataset, targets_of
from kernel_utils.stages.inputs import ExtraSlices, Views, data_fingerprint
from kernel_utils.stages.localisation_data import FeatureSequences
from kernel_utils.training import (
    TrainConfig,
    atomic_save,
    checkpoint_paths,
    fit,
    load_best,
    load_checkpoint,
    predict,
)

log = logging.getLogger(__name__)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _wide(uids: list[str], probs: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"StudyInstanceUID": uids, **{t: probs[:, j] for j, t in enumerate(TARGETS)}})


def with_patient_mode(probs: np.ndarray, mode: str) -> np.ndarray:
    """probs [N, 8] with patient_overall from the patient head ("head") or 1 - prod(1 - p_Ck) ("product")."""
    out = probs.copy()
    if mode == "product":
        out[:, 7] = 1 - np.prod(1 - probs[:, :7], axis=1)
    return out


def _whole(x: np.ndarray, _) -> np.ndarray:
    return x


def studies_of(inputs: Sequence[np.ndarray], index) -> Views:
    """The studies `index` of `inputs`, read when asked."""
    return Views(inputs, [(int(i), None) for i in index], _whole)


def vertebra_samples(inputs: Sequence[np.ndarray], targets: np.ndarray, augment: bool,
                     image_channels: int | None, rotate_shift: bool = True,
                     slice_targets: np.ndarray | None = None, block=None) -> FractureDataset:
    """One sample per vertebra of studies' inputs: `block(x, k)` cuts vertebra k's part out of a study's input
    (`settings.vertebra_block`; default x[k] of per-vertebra inputs [7, N, C, H, W]); target [1], and with
    slice_targets [S, 7, N] (`slice_targets_of`) each slice's label, slice_target [N]."""
    per_slice = None if slice_targets is None else slice_targets.reshape(-1, slice_targets.shape[-1])
    blocks = Views(inputs, [(i, k) for i in range(len(inputs)) for k in range(7)], block or _item)
    return FractureDataset(blocks, targets[:, :7].reshape(-1, 1),
                           augment=augment, image_channels=image_channels, rotate_shift=rotate_shift,
                           slice_targets=per_slice)


def _item(x: np.ndarray, i: int) -> np.ndarray:
    """x[i]: a vertebra of per-vertebra inputs [7, ...], a slice of a study sequence [N, ...]."""
    return x[i]


def fit_patient_head(model: torch.nn.Module, inputs: list[np.ndarray], targets: np.ndarray, seed: int,
                     steps: int = 300, lr: float = 1e-3) -> list[float]:
    """Train the patient head alone on the frozen vertebra features of the training studies (patient_overall,
    the metric's 2:1 weights); the head starts from a seeded initialisation, so a rerun gives the same weights.
    `model`: any with `vertebra_features`, `patient_logit` and `patient_head` (`VertebraCnnLstm`, or
    `ViTClassifier` with encode="vertebra"). Returns the loss of every step."""
    feats = torch.from_numpy(predict(model, FractureDataset(inputs, None), 8, forward=model.vertebra_features))
    target = torch.from_numpy(targets[:, 7:8].astype(np.float32))
    model.cpu()
    head = model.patient_head
    torch.manual_seed(seed)
    for layer in head:
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            loss = vertebra_bce(model.patient_logit(feats), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return losses


SEQUENCE_ONLY = ("hidden", "sequence_epochs", "sequence_lr")  # the first phase ignores these


def slice_phase_config(cfg: TrainConfig) -> TrainConfig:
    """The study form's first phase: the same settings on single slices (less those of the BiLSTM alone), its own
    checkpoints."""
    params = tuple((k, v) for k, v in cfg.params if k not in SEQUENCE_ONLY)
    return dataclasses.replace(cfg, stage=f"{cfg.stage}_slices", batch_size=max(16, cfg.batch_size), params=params)


def sequence_phase_config(settings) -> TrainConfig:
    """The study form's second phase: the BiLSTM and head on frozen slice features, its own checkpoints. Its run
    name follows the first phase's (the features it learns from), so a changed slice phase never resumes it."""
    cfg = settings.cfg
    return dataclasses.replace(cfg, stage=f"{cfg.stage}_sequence", epochs=settings.sequence_epochs,
                               lr=settings.sequence_lr,
                               params=(*cfg.params, ("slice_phase", slice_phase_config(cfg).run_name)))


def slice_features_of(model, inputs: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """The study model's per-slice CNN features of every study, float32 [S, N, F]."""
    return predict(model, FractureDataset(inputs, None), batch_size, forward=model.encoder.slice_features)


def labelled_slices(inputs: Sequence[np.ndarray], slice_targets: np.ndarray, augment: bool,
                    image_channels: int | None, rotate_shift: bool = True) -> FractureDataset:
    """The slices of study-form inputs [N, C, H, W] whose image-level label is known: images [C, H, W], target [1]."""
    known = np.argwhere(~np.isnan(slice_targets))
    return FractureDataset(Views(inputs, [(int(i), int(j)) for i, j in known], _item),
                           slice_targets[known[:, 0], known[:, 1], None],
                           augment=augment, image_channels=image_channels, rotate_shift=rotate_shift)


def _train_fold(settings, model, inputs, targets, slice_targets, tr, va, fold, out_dir, image_channels,
                progress, extra_slices=None, data_key: str = "") -> list[tuple[str, pd.DataFrame]]:
    """Fit one fold and leave its best weights in `model`; returns (what was trained, history) of each phase.
    Training on single vertebrae adds the patient head stage; `slices_first` trains the CNN on slices first.
    data_key: `data_fingerprint` of what the folds train on (a checkpoint of other data is not resumed)."""
    tr_inputs, va_inputs = studies_of(inputs, tr), studies_of(inputs, va)
    phases = []
    if settings.trains_on_vertebrae:
        weight = float(settings.slice_loss)
        with_slices = weight > 0 and slice_targets is not None and bool(np.nansum(slice_targets[tr]))
        if weight > 0 and not with_slices:
            log.warning("fold %d: no boxed slice (train_bounding_boxes.csv) for the per-slice auxiliary loss; "
                        "the vertebra label alone trains", fold)
        train_ds = vertebra_samples(tr_inputs, targets[tr], True, image_channels, settings.rotate_shift,
                                    slice_targets[tr] if with_slices else None, settings.vertebra_block)
        valid_ds = vertebra_samples(va_inputs, targets[va], False, image_channels,  # model choice: vertebra loss
                                    block=settings.vertebra_block)
        loss_fn, forward = ((functools.partial(vertebra_slice_loss, slice_weight=weight),
                             model.vertebra_and_slice_logits) if with_slices else (vertebra_batch_loss, None))
        hist = fit(model, train_ds, valid_ds, loss_fn, settings.cfg, out_dir, fold, progress=progress, forward=forward,
                   data_key=data_key)
        load_best(model, out_dir, settings.cfg, fold)
        losses = fit_patient_head(model, tr_inputs, targets[tr], seed=settings.cfg.seed + fold)
        best_path, _ = checkpoint_paths(Path(out_dir), settings.cfg, fold)
        state = load_checkpoint(best_path)
        atomic_save({**state, "model": model.state_dict(), "patient_head_loss": losses[-1]}, best_path)
        return [(f"{settings.name} (single vertebrae)", hist)]
    if settings.slices_first:
        extra = extra_slices.samples(tr, image_channels, settings.rotate_shift) if extra_slices else None
        fractured = (np.nansum(slice_targets[tr]) if slice_targets is not None else 0) + (
            extra.targets.sum() if extra is not None else 0)
        if slice_targets is None or not fractured:
            log.warning("fold %d: no fractured slice to train the CNN on first (train_bounding_boxes.csv, or "
                        "vertebra labels with notebook 02's ranges); the study model trains end to end", fold)
        else:
            slice_cfg = slice_phase_config(settings.cfg)
            first = model.slice_model()
            train_slices = labelled_slices(tr_inputs, slice_targets[tr], True, image_channels, settings.rotate_shift)
            hist = fit(first, train_slices if extra is None else ConcatDataset([train_slices, extra]),
                       labelled_slices(va_inputs, slice_targets[va], False, image_channels), vertebra_batch_loss,
                       slice_cfg, out_dir, fold, progress=progress, data_key=data_key)
            load_best(first, out_dir, slice_cfg, fold)
            model.encoder.freeze_backbone()
            phases.append((f"{settings.name} (CNN on slices)", hist))
            feats = slice_features_of(model, inputs, slice_cfg.batch_size)
            seq_cfg = sequence_phase_config(settings)
            hist = fit(SequenceOnFeatures(model), FeatureSequences(list(feats[tr]), list(targets[tr])),
                       FeatureSequences(list(feats[va]), list(targets[va])), batch_loss, seq_cfg, out_dir, fold,
                       progress=progress, data_key=data_key)
            load_best(SequenceOnFeatures(model), out_dir, seq_cfg, fold)
            best_path, _ = checkpoint_paths(Path(out_dir), settings.cfg, fold)
            atomic_save({"model": model.state_dict(), "config": settings.cfg.to_json(),
                         "score": float(hist.get("valid_loss", hist.train_loss).min())}, best_path)
            return [*phases, (settings.name, hist)]
    train_ds = FractureDataset(tr_inputs, targets[tr], augment=True, image_channels=image_channels,
                               rotate_shift=settings.rotate_shift)
    hist = fit(model, train_ds, FractureDataset(va_inputs, targets[va]), batch_loss, settings.cfg, out_dir,
               fold, progress=progress, data_key=data_key)
    load_best(model, out_dir, settings.cfg, fold)
    return [*phases, (settings.name, hist)]


def cross_validate_fracture(uids: list[str], inputs: Sequence[np.ndarray], labels: pd.DataFrame, settings,
                            out_dir: str | os.PathLike, progress: bool = True,
                            slice_targets: np.ndarray | None = None,
                            extra_slices: ExtraSlices | None = None) -> dict:
    """Train one model per fold (folds stratified by the labels, grouped by study) and predict its held-out fold.

    settings: any form of the stage contract. inputs: each study's input (`StudyInputs`, read study by study, or
    a list). slice_targets: image-level labels of the sampled slices (`slice_targets_of`): the first phase of a
    form that trains its CNN on slices first, float [S, N]; the per-slice auxiliary loss of training on single
    vertebrae (`slice_loss` its weight), float [S, 7, N]. extra_slices: labelled slices the inputs do not sample
    (`inputs.extra_slice_inputs`), more for that first phase.

    Returns:
        oof: wide out-of-fold predictions (patient_overall by the mode chosen); raw_oof: [N, 8] sigmoid outputs;
        patient_mode, patient_scores (loss of each mode); scores: loss per fold and overall, both
        normalisations; histories; folds (uid -> fold); data_key (`data_fingerprint` of what the folds trained on).
    """
    labels = labels.set_index("StudyInstanceUID").loc[uids].reset_index()
    folds = make_folds(labels, min(settings.n_folds, max(2, len(uids) // 2)))
    fold_of = folds.reindex(uids).to_numpy()
    targets = targets_of(labels, uids)
    raw = np.zeros((len(uids), 8), dtype=np.float32)
    histories = []
    channels = settings.in_channels(inputs[0])
    image_channels = settings.image_channels(channels)
    data_key = data_fingerprint(inputs, targets, slice_targets, extra_slices)
    for k in sorted(set(fold_of)):
        tr, va = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        model = create_model(settings.cfg, channels)
        for name, hist in _train_fold(settings, model, inputs, targets, slice_targets, tr, va, int(k), out_dir,
                                      image_channels, progress, extra_slices, data_key):
            histories.append(hist.assign(model=name, fold=int(k)))
        valid_ds = FractureDataset(studies_of(inputs, va), targets[va])
        raw[va] = _sigmoid(predict(model, valid_ds, batch_size=settings.cfg.batch_size))
    truth = labels[["StudyInstanceUID", *TARGETS]]
    patient_scores = {m: competition_loss(truth, _wide(uids, with_patient_mode(raw, m)))
                      for m in settings.patient_modes}
    mode = min(patient_scores, key=patient_scores.get)
    oof = _wide(uids, with_patient_mode(raw, mode)).assign(fold=fold_of)
    rows = []
    for k, part in oof.groupby("fold"):
        t = truth[truth.StudyInstanceUID.isin(part.StudyInstanceUID)]
        rows.append({"fold": k, **{f"loss_{n}": competition_loss(t, part, n) for n in NORMALIZATIONS}})
    rows.append({"fold": "all", **{f"loss_{n}": competition_loss(truth, oof, n) for n in NORMALIZATIONS}})
    return {"oof": oof, "raw_oof": raw, "patient_mode": mode, "patient_scores": patient_scores,
            "scores": pd.DataFrame(rows).set_index("fold"), "histories": pd.concat(histories, ignore_index=True),
            "folds": dict(zip(uids, fold_of.tolist(), strict=True)), "data_key": data_key}


def load_fold_models(settings, channels: int, out_dir: str | os.PathLike, n_folds: int) -> list[torch.nn.Module]:
    return [load_best(create_model(settings.cfg, channels), out_dir, settings.cfg, k) for k in range(n_folds)]


def fold_mean(models: list[torch.nn.Module], inputs: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """The fold models' mean probability of C1..C7 and the patient head: float [N, 8]."""
    ds = FractureDataset(inputs, None)
    return np.mean([_sigmoid(predict(m, ds, batch_size=batch_size)) for m in models], axis=0)


def predict_fracture(models: list[torch.nn.Module], uids: list[str], inputs: Sequence[np.ndarray], settings,
                     patient_mode: str) -> pd.DataFrame:
    """Wide predictions of the fold models' mean probability for each study."""
    if not uids:
        return pd.DataFrame(columns=["StudyInstanceUID", *TARGETS])
    return _wide(uids, with_patient_mode(fold_mean(models, inputs, settings.cfg.batch_size), patient_mode))


def loss_accuracy_table(cv: dict, uids: list[str], inputs: Sequence[np.ndarray], labels: pd.DataFrame,
                        models: list[torch.nn.Module], settings) -> pd.DataFrame:
    """Seed 004's table per fold: train and validation loss (competition metric) and accuracy (labels at 0.5)."""
    truth = labels.set_index("StudyInstanceUID").loc[uids, TARGETS].reset_index()
    folds = np.array([cv["folds"][u] for u in uids])
    rows = []
    for k, model in enumerate(models):
        tr = np.flatnonzero(folds != k)
        train_pred = predict_fracture([model], [uids[i] for i in tr], studies_of(inputs, tr), settings,
                                      cv["patient_mode"])
        valid_pred = cv["oof"][cv["oof"].fold == k]
        row = {"fold": k}
        for name, pred in (("train", train_pred), ("validation", valid_pred)):
            t = truth[truth.StudyInstanceUID.isin(pred.StudyInstanceUID)]
            p = pred.set_index("StudyInstanceUID").loc[t.StudyInstanceUID, TARGETS].to_numpy()
            row[f"{name} loss"] = competition_loss(t, pred)
            row[f"{name} accuracy"] = float(((p >= 0.5) == (t[TARGETS].to_numpy() > 0.5)).mean())
        rows.append(row)
    return pd.DataFrame(rows).set_index("fold")


def save_predictions(work_dir, settings, oof: pd.DataFrame, test: pd.DataFrame, meta: dict) -> Path:
    """`predictions/<name>_oof.csv`, `_test.csv` and `<name>.json` (the form, its settings and `meta`), each
    written atomically."""
    layout = layout_of(work_dir)
    write_csv(layout.prediction(settings.name, "oof"), oof)
    write_csv(layout.prediction(settings.name, "test"), test)
    write_json(layout.model_meta(settings.name), {"form": settings.form, "settings": settings.to_json(),
                                                  "run_name": settings.cfg.run_name, **meta})
    return layout.predictions
