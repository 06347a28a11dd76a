"""Fracture detection stage (notebook 03): inputs for every study, cross-validated CNN + BiLSTM in both forms,
out-of-fold and test predictions in the wide per-study format, and the inference `05` calls.

Outputs under `WORK_DIR/predictions/`: `<name>_oof.csv`, `<name>_test.csv`, `<name>.json` (settings, run
name, folds, how patient_overall is made); weights under `WORK_DIR/models/fracture/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kernel_utils.folds import make_folds
from kernel_utils.io.cache import CacheSpec, iter_cached
from kernel_utils.metric import NORMALIZATIONS, TARGETS, competition_loss
from kernel_utils.nets import create_model
from kernel_utils.nets.fracture_nets import (
    SliceFracture,
    batch_loss,
    vertebra_batch_loss,
    vertebra_bce,
    vertebra_slice_loss,
)
from kernel_utils.stages.fracture_data import (
    FractureDataset,
    crop_box_on_cache,
    study_sequence,
    study_slices,
    targets_of,
    vertebra_stacks,
)
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
FORMS = ("vertebra", "study")


@dataclass(frozen=True)
class FractureSettings:
    """One fracture model: its form, training config and input sizes (in `cfg.params`). `variant` tells apart
    several models of one form (another backbone for the blend): it names their predictions, the weights files are
    named by `cfg.run_name` anyway."""

    form: str
    cfg: TrainConfig
    n_folds: int
    variant: str = ""

    @property
    def name(self) -> str:
        return f"cnn_lstm_{self.form}" + (f"_{self.variant}" if self.variant else "")

    @staticmethod
    def for_profile(profile: str, form: str, model: str = "", pretrained_path: str = "",
                    variant: str = "") -> FractureSettings:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        # folds, epochs, steps cap, batch, vertebra slices, crop, study slices, study size
        table = {"smoke": (2, 1, 2, 4, 5, 32, 8, 32), "demo": (3, 3, 0, 8, 9, 48, 16, 64),
                 "bench": (5, 25, 0, 8, 15, 64, 32, 96), "full": (5, 15, 0, 8, 15, 128, 64, 256)}
        folds, epochs, steps, batch, n_v, crop, n_s, size = table[profile]
        default = {"vertebra": "tf_efficientnetv2_s" if profile == "full" else "tf_efficientnetv2_b0",
                   "study": "resnet50" if profile in ("bench", "full") else "resnet18"}[form]
        # train_on "vertebrae": one sample per vertebra (7x the optimiser steps of whole studies; with flips instead of
        # the warp, the CPU pilot's mean vertebra AUC rose from 0.66 to 0.81), then the patient head on frozen
        # features; "studies": end to end
        # study "train": "slices_then_sequence" as seed 002 (the CNN on boxed and negative slices first, then the
        # BiLSTM on its frozen features), or "end_to_end"
        # slice_loss: weight of the per-slice auxiliary BCE where train_bounding_boxes.csv says which sampled slices
        # hold the fracture (and every slice of a healthy vertebra is 0); 0 turns it off (CPU pilot: mean vertebra
        # AUC 0.81 -> 0.85, OOF loss 0.82x -> 0.78x the prior)
        # rotate_shift False: flips and intensity jitter only; the bilinear warp of a rotation washes out a fracture
        # line one or two pixels wide (bench set, one split and seed, epoch 5: mean vertebra AUC 0.85 with the
        # warp, 0.92 with flips alone)
        # channel: the cached window the 2.5D stack is made of (0 soft tissue, 1 standard bone, 2 gross bone); gross
        # bone (W650/L400) shows a lucent line in cancellous bone with 2.7x the grey levels of standard bone (CPU
        # pilot: mean vertebra AUC 0.85 -> 0.98 out of fold, 0.98 on the held-out test set; test loss 0.41 -> 0.36)
        params = (("hidden", 128), ("n_slices", n_v), ("context", 1), ("step", 1), ("crop", crop), ("channel", 2),
                  ("train_on", "vertebrae"), ("rotate_shift", False), ("slice_loss", 1.0)) if form == "vertebra" else (
            ("hidden", 128), ("n_slices", n_s), ("size", size), ("train", "slices_then_sequence"),
            ("rotate_shift", True))
        cfg = TrainConfig(stage=f"cnn_lstm_{form}", model=model or default, epochs=epochs, batch_size=batch,
                          lr=1e-3 if form == "vertebra" else 2e-4, patience=4, max_steps_per_epoch=steps,
                          pretrained_path=pretrained_path, params=params)
        return FractureSettings(form, cfg, folds, variant)


def _names(csv: str) -> list[str]:
    return [item.strip() for item in csv.split(",") if item.strip()]


def planned_runs(profile: str, forms: str, models: dict[str, str], pretrained: dict[str, str],
                 extra_vertebra_models: str = "", extra_pretrained: str = "") -> list[tuple[str, FractureSettings]]:
    """Notebook 03's models, as (key, settings): each form of the comma-separated `forms` with its backbone and weights
    file (`models`, `pretrained`: form -> timm name, path; empty: the profile's, random initialisation), keyed by form,
    then each extra per-vertebra backbone (comma-separated), keyed by its prediction name, with the weights file at the
    same place in `extra_pretrained` (empty: random initialisation for all)."""
    chosen = _names(forms)
    extra, weights = _names(extra_vertebra_models), _names(extra_pretrained)
    if weights and len(weights) != len(extra):
        raise ValueError(f"{len(weights)} extra weights files for {len(extra)} extra backbones: give one per backbone "
                         f"({extra_pretrained!r} for {extra_vertebra_models!r})")
    if extra and "vertebra" not in chosen:
        raise ValueError(f"extra per-vertebra backbones {extra} given, but the forms {chosen} leave out 'vertebra'")
    runs = [(form, FractureSettings.for_profile(profile, form, models.get(form, ""), pretrained.get(form, "")))
            for form in chosen]
    for i, model in enumerate(extra):
        settings = FractureSettings.for_profile(profile, "vertebra", model, weights[i] if weights else "", model)
        runs.append((settings.name, settings))
    return runs


def build_inputs(data_dir: str | os.PathLike, work_dir: str | os.PathLike, spec: CacheSpec,
                 settings: FractureSettings, split: str) -> tuple[list[str], list[np.ndarray], list[dict]]:
    """(uids, inputs, metas) of every readable study of a split; per-vertebra inputs use notebook 02's
    localisation when it exists, else the whole-study fallback. A meta holds what Grad-CAM boxes need:
    used slice indices [7, N], crop boxes [7, 4], slice_numbers, cache and original in-plane sizes."""
    work_dir = Path(work_dir)
    loc_path = work_dir / "localisation" / "vertebrae.csv"
    loc = pd.read_csv(loc_path) if loc_path.exists() else None
    if settings.form == "vertebra" and loc is None:
        log.warning("no %s: every study falls back to seven even windows", loc_path)
    p = dict(settings.cfg.params)
    uids, inputs, metas = [], [], []
    for _, uid, entry in iter_cached(data_dir, work_dir, spec, (split,)):
        meta = {"slice_numbers": entry["slice_numbers"], "cache_size": entry["images"].shape[1:3],
                "original_size": tuple(int(v) for v in entry["original_shape"][1:])}
        if settings.form == "vertebra":
            mask_path = work_dir / "localisation" / "masks" / f"{uid}.npz"
            mask = np.load(mask_path)["mask"] if mask_path.exists() else None
            rows = loc[loc.StudyInstanceUID == uid] if loc is not None else None
            x, meta["used"], meta["crop_boxes"] = vertebra_stacks(
                entry["images"], mask, rows, p["n_slices"], p["context"], p["step"], p["crop"],
                p.get("channel", 1))  # a run configured before `channel` existed took the standard bone window
        else:
            x = study_sequence(entry["images"], crop_box_on_cache(entry), p["n_slices"], p["size"])
            meta["used"] = study_slices(len(entry["images"]), p["n_slices"])
        uids.append(uid)
        inputs.append(x)
        metas.append(meta)
    return uids, inputs, metas


def in_channels(settings, inputs: list[np.ndarray]) -> int:
    """Input channels of the network: C of [..., C, H, W] inputs, or of [C, D, H, W] volumes for the ViT."""
    return int(inputs[0].shape[0] if settings.form == "vit" else inputs[0].shape[-3])


def _image_channels(settings, channels: int) -> int | None:
    """How many leading channels get intensity jitter (not the mask channel of the per-vertebra form)."""
    return {"vertebra": channels - 1, "study": channels}.get(settings.form)


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


def _trains_on_vertebrae(settings) -> bool:
    return settings.form in ("vertebra", "vit") and settings.cfg.param("train_on", "studies") == "vertebrae"


def vertebra_samples(inputs: list[np.ndarray], targets: np.ndarray, augment: bool,
                     image_channels: int | None, rotate_shift: bool = True,
                     slice_targets: np.ndarray | None = None, volumes: bool = False) -> FractureDataset:
    """One sample per vertebra of per-vertebra inputs [7, N, C, H, W]: images [N, C, H, W], target [1], and
    with slice_targets [S, 7, N] (`slice_targets_of`) each slice's label, slice_target [N]. `volumes`: the inputs
    are the ViT's [C, 7 * d, H, W], each vertebra's block [C, d, H, W]."""
    per_slice = None if slice_targets is None else slice_targets.reshape(-1, slice_targets.shape[-1])
    blocks = [b for x in inputs for b in (np.split(x, 7, axis=1) if volumes else x)]
    return FractureDataset(blocks, targets[:, :7].reshape(-1, 1),
                           augment=augment, image_channels=image_channels, rotate_shift=rotate_shift,
                           slice_targets=per_slice)


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


def slice_phase_config(cfg: TrainConfig) -> TrainConfig:
    """The study form's first phase: the same settings on single slices, its own checkpoints."""
    return dataclasses.replace(cfg, stage=f"{cfg.stage}_slices", batch_size=max(16, cfg.batch_size))


def labelled_slices(inputs: list[np.ndarray], slice_targets: np.ndarray, augment: bool,
                    image_channels: int | None, rotate_shift: bool = True) -> FractureDataset:
    """The slices of study-form inputs [N, C, H, W] whose image-level label is known: images [C, H, W], target [1]."""
    known = np.argwhere(~np.isnan(slice_targets))
    return FractureDataset([inputs[i][j] for i, j in known], slice_targets[known[:, 0], known[:, 1], None],
                           augment=augment, image_channels=image_channels, rotate_shift=rotate_shift)


def _train_fold(settings, model, inputs, targets, slice_targets, tr, va, fold, out_dir, image_channels,
                progress) -> list[tuple[str, pd.DataFrame]]:
    """Fit one fold and leave its best weights in `model`; returns (what was trained, history) of each phase.
    Vertebra sampling adds the patient head stage; the study form trains the CNN on slices first."""
    tr_inputs, va_inputs = [inputs[i] for i in tr], [inputs[i] for i in va]
    phases = []
    if _trains_on_vertebrae(settings):
        weight = float(settings.cfg.param("slice_loss", 0.0))
        with_slices = weight > 0 and slice_targets is not None and bool(np.nansum(slice_targets[tr]))
        if weight > 0 and not with_slices:
            log.warning("fold %d: no boxed slice (train_bounding_boxes.csv) for the per-slice auxiliary loss; "
                        "the vertebra label alone trains", fold)
        train_ds = vertebra_samples(tr_inputs, targets[tr], True, image_channels,
                                    bool(settings.cfg.param("rotate_shift", True)),
                                    slice_targets[tr] if with_slices else None, volumes=settings.form == "vit")
        valid_ds = vertebra_samples(va_inputs, targets[va], False, image_channels,  # model choice: vertebra loss
                                    volumes=settings.form == "vit")
        loss_fn, forward = ((functools.partial(vertebra_slice_loss, slice_weight=weight),
                             model.vertebra_and_slice_logits) if with_slices else (vertebra_batch_loss, None))
        hist = fit(model, train_ds, valid_ds, loss_fn, settings.cfg, out_dir, fold, progress=progress, forward=forward)
        load_best(model, out_dir, settings.cfg, fold)
        losses = fit_patient_head(model, tr_inputs, targets[tr], seed=settings.cfg.seed + fold)
        best_path, _ = checkpoint_paths(Path(out_dir), settings.cfg, fold)
        state = load_checkpoint(best_path)
        atomic_save({**state, "model": model.state_dict(), "patient_head_loss": losses[-1]}, best_path)
        return [(f"{settings.name} (single vertebrae)", hist)]
    if settings.form == "study" and settings.cfg.param("train") == "slices_then_sequence":
        if slice_targets is None or not np.nansum(slice_targets[tr]):
            log.warning("fold %d: no boxed slice to train the CNN on first (train_bounding_boxes.csv); the study "
                        "model trains end to end", fold)
        else:
            slice_cfg = slice_phase_config(settings.cfg)
            first = SliceFracture(model.encoder.backbone)
            warp = bool(settings.cfg.param("rotate_shift", True))
            hist = fit(first, labelled_slices(tr_inputs, slice_targets[tr], True, image_channels, warp),
                       labelled_slices(va_inputs, slice_targets[va], False, image_channels), vertebra_batch_loss,
                       slice_cfg, out_dir, fold, progress=progress)
            load_best(first, out_dir, slice_cfg, fold)
            model.encoder.freeze_backbone()
            phases.append((f"{settings.name} (CNN on slices)", hist))
    train_ds = FractureDataset(tr_inputs, targets[tr], augment=True, image_channels=image_channels,
                               rotate_shift=bool(settings.cfg.param("rotate_shift", True)))
    hist = fit(model, train_ds, FractureDataset(va_inputs, targets[va]), batch_loss, settings.cfg, out_dir,
               fold, progress=progress)
    load_best(model, out_dir, settings.cfg, fold)
    return [*phases, (settings.name, hist)]


def cross_validate_fracture(uids: list[str], inputs: list[np.ndarray], labels: pd.DataFrame,
                            settings: FractureSettings, out_dir: str | os.PathLike, progress: bool = True,
                            slice_targets: np.ndarray | None = None) -> dict:
    """Train one model per fold (folds stratified by the labels, grouped by study) and predict its held-out fold.

    Serves every study-level model: the CNN + BiLSTM forms here and the ViT of notebook 04 (`ViTSettings`).
    slice_targets: image-level labels of the sampled slices (`slice_targets_of`): the study form's first phase,
    float [S, N]; the per-vertebra form's auxiliary loss (param `slice_loss` its weight), float [S, 7, N].

    Returns:
        oof: wide out-of-fold predictions (patient_overall by the mode chosen); raw_oof: [N, 8] sigmoid outputs;
        patient_mode, patient_scores (loss of each mode); scores: loss per fold and overall, both
        normalisations; histories; folds (uid -> fold).
    """
    labels = labels.set_index("StudyInstanceUID").loc[uids].reset_index()
    folds = make_folds(labels, min(settings.n_folds, max(2, len(uids) // 2)))
    fold_of = folds.reindex(uids).to_numpy()
    targets = targets_of(labels, uids)
    raw = np.zeros((len(uids), 8), dtype=np.float32)
    histories = []
    channels = in_channels(settings, inputs)
    image_channels = _image_channels(settings, channels)
    for k in sorted(set(fold_of)):
        tr, va = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        model = create_model(settings.cfg, channels)
        for name, hist in _train_fold(settings, model, inputs, targets, slice_targets, tr, va, int(k), out_dir,
                                      image_channels, progress):
            histories.append(hist.assign(model=name, fold=int(k)))
        valid_ds = FractureDataset([inputs[i] for i in va], targets[va])
        raw[va] = _sigmoid(predict(model, valid_ds, batch_size=settings.cfg.batch_size))
    truth = labels[["StudyInstanceUID", *TARGETS]]
    modes = ("head", "product") if settings.form == "vertebra" or _trains_on_vertebrae(settings) else ("head",)
    patient_scores = {m: competition_loss(truth, _wide(uids, with_patient_mode(raw, m))) for m in modes}
    mode = min(patient_scores, key=patient_scores.get)
    oof = _wide(uids, with_patient_mode(raw, mode)).assign(fold=fold_of)
    rows = []
    for k, part in oof.groupby("fold"):
        t = truth[truth.StudyInstanceUID.isin(part.StudyInstanceUID)]
        rows.append({"fold": k, **{f"loss_{n}": competition_loss(t, part, n) for n in NORMALIZATIONS}})
    rows.append({"fold": "all", **{f"loss_{n}": competition_loss(truth, oof, n) for n in NORMALIZATIONS}})
    return {"oof": oof, "raw_oof": raw, "patient_mode": mode, "patient_scores": patient_scores,
            "scores": pd.DataFrame(rows).set_index("fold"), "histories": pd.concat(histories, ignore_index=True),
            "folds": dict(zip(uids, fold_of.tolist(), strict=True))}


def load_fold_models(settings: FractureSettings, channels: int, out_dir: str | os.PathLike,
                     n_folds: int) -> list[torch.nn.Module]:
    return [load_best(create_model(settings.cfg, channels), out_dir, settings.cfg, k) for k in range(n_folds)]


def predict_fracture(models: list[torch.nn.Module], uids: list[str], inputs: list[np.ndarray],
                     settings: FractureSettings, patient_mode: str) -> pd.DataFrame:
    """Wide predictions of the fold models' mean probability for each study."""
    if not uids:
        return pd.DataFrame(columns=["StudyInstanceUID", *TARGETS])
    ds = FractureDataset(inputs, None)
    probs = np.mean([_sigmoid(predict(m, ds, batch_size=settings.cfg.batch_size)) for m in models], axis=0)
    return _wide(uids, with_patient_mode(probs, patient_mode))


def loss_accuracy_table(cv: dict, uids: list[str], inputs: list[np.ndarray], labels: pd.DataFrame,
                        models: list[torch.nn.Module], settings) -> pd.DataFrame:
    """Seed 004's table per fold: train and validation loss (competition metric) and accuracy (labels at 0.5)."""
    truth = labels.set_index("StudyInstanceUID").loc[uids, TARGETS].reset_index()
    folds = np.array([cv["folds"][u] for u in uids])
    rows = []
    for k, model in enumerate(models):
        tr = np.flatnonzero(folds != k)
        train_pred = predict_fracture([model], [uids[i] for i in tr], [inputs[i] for i in tr], settings,
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


def save_predictions(work_dir: str | os.PathLike, settings: FractureSettings, oof: pd.DataFrame,
                     test: pd.DataFrame, meta: dict) -> Path:
    """`predictions/<name>_oof.csv`, `_test.csv` and `<name>.json`, each written atomically."""
    folder = Path(work_dir) / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, df in (("oof", oof), ("test", test)):
        tmp = folder / f".{settings.name}_{suffix}.csv.tmp"
        df.to_csv(tmp, index=False)
        os.replace(tmp, folder / f"{settings.name}_{suffix}.csv")
    (folder / f"{settings.name}.json").write_text(json.dumps(
        {"form": settings.form, "variant": getattr(settings, "variant", ""), "run_name": settings.cfg.run_name,
         "config": settings.cfg.to_json(),
         "n_folds": settings.n_folds, **meta}, indent=1, default=str))
    return folder
