"""Vertebra localisation (notebook 02): per-slice classifiers (RandomForest, timm CNN with a BiGRU) as in seed
000 and a MONAI 3D UNet as the winners do, cross-validated over the segmented studies, with the tables that
compare them. Applying the fold models to every study is `vertebra_localiser.py`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from tqdm.auto import tqdm

from kernel_utils.nets import create_model
from kernel_utils.stages.localisation_data import (
    FeatureSequences,
    SliceDataset,
    VolumeDataset,
    bce_loss,
    dice_ce_loss,
    dice_per_vertebra,
    rf_features,
)
from kernel_utils.stages.localisation_settings import LocalisationSettings
from kernel_utils.stages.vertebra_localiser import segment, sequence_probabilities, slice_features
from kernel_utils.stages.vertebra_targets import CERVICAL, enforce_order, ranges_from_presence, slice_targets
from kernel_utils.training import fit, load_best, predict

VERTEBRAE = [f"C{k}" for k in CERVICAL]


def study_folds(uids: list[str], n_folds: int, seed: int = 42) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uids))
    return {uids[i]: int(k % n_folds) for k, i in enumerate(order)}


def segmented_studies(entries, settings: LocalisationSettings, cropped: bool = False) -> list[dict]:
    """What `cross_validate` trains on, from (split, uid, cache entry) of the segmented studies: dicts with uid,
    images uint8 [Z, S, S, C], mask uint8 [Z, S, S] and roi (the 3D UNet's in-plane box, None: the whole frame)."""
    return [{"uid": uid, "images": e["images"], "mask": e["mask"], "roi": settings.seg_roi(e, cropped)}
            for _, uid, e in entries]


def cross_validate(studies: list[dict], settings: LocalisationSettings, out_dir: str | os.PathLike,
                   progress: bool = True, slice_models: bool = True) -> dict:
    """Train and score RF, CNN and 3D UNet over folds of the segmented studies.

    Args:
        studies: dicts with uid, images uint8 [Z, S, S, C], mask uint8 [Z, S, S] and optionally roi
            (`segmented_studies`).
        slice_models: False trains and scores the 3D UNet alone (its benchmark pilot; `slices` is then empty).

    Returns:
        slices: one row per held-out slice (uid, z, true/rf/cnn/seq C1..C7, seq the CNN + BiGRU); dice: one row per
        held-out study; ranges: slice-range errors per held-out study, vertebra and source (unet3d, cnn_bigru);
        histories: training curves per (model, fold); folds: uid -> fold; seconds per model.
    """
    out_dir = Path(out_dir)
    for s in studies:
        s["presence"], _ = slice_targets(s["mask"])
    n_folds = max(2, min(settings.n_folds, len(studies)))
    folds = study_folds([s["uid"] for s in studies], n_folds)
    slice_rows, dice_rows, range_rows, histories = [], [], [], []
    seconds = {"random_forest": 0.0, "cnn": 0.0, "cnn_bigru": 0.0, "unet3d": 0.0}
    for k in tqdm(range(n_folds), desc="localisation folds", disable=not progress):
        train = [s for s in studies if folds[s["uid"]] != k]
        valid = [s for s in studies if folds[s["uid"]] == k]
        if slice_models:
            start = time.perf_counter()
            rf = RandomForestClassifier(settings.rf_trees, n_jobs=-1, random_state=k, min_samples_leaf=2)
            rf.fit(np.concatenate([rf_features(s["images"], settings.rf_pixels) for s in train]),
                   np.concatenate([s["presence"] for s in train]))
            seconds["random_forest"] += time.perf_counter() - start
            start = time.perf_counter()
            cnn = create_model(settings.slice_cfg, train[0]["images"].shape[-1])
            hist = fit(cnn, SliceDataset(train, augment=True), SliceDataset(valid), bce_loss, settings.slice_cfg,
                       out_dir, k, progress=progress)
            histories.append(hist.assign(model="cnn", fold=k))
            cnn = load_best(cnn, out_dir, settings.slice_cfg, k)
            seconds["cnn"] += time.perf_counter() - start
            start = time.perf_counter()  # seed 002's second stage: a BiGRU on the sequences of CNN features
            feats = {s["uid"]: slice_features(cnn, s["images"]) for s in train + valid}
            head = create_model(settings.sequence_cfg, next(iter(feats.values())).shape[1])
            hist = fit(head, FeatureSequences([feats[s["uid"]] for s in train], [s["presence"] for s in train]),
                       FeatureSequences([feats[s["uid"]] for s in valid], [s["presence"] for s in valid]), bce_loss,
                       settings.sequence_cfg, out_dir, k, progress=progress)
            histories.append(hist.assign(model="cnn_bigru", fold=k))
            head = load_best(head, out_dir, settings.sequence_cfg, k)
            seconds["cnn_bigru"] += time.perf_counter() - start
        start = time.perf_counter()
        unet = create_model(settings.seg_cfg, train[0]["images"].shape[-1])
        hist = fit(unet, VolumeDataset(train, settings.seg_size, augment=True, affine=settings.seg_affine),
                   VolumeDataset(valid, settings.seg_size),
                   dice_ce_loss, settings.seg_cfg, out_dir, k, progress=progress)
        histories.append(hist.assign(model="unet3d", fold=k))
        unet = load_best(unet, out_dir, settings.seg_cfg, k)
        seconds["unet3d"] += time.perf_counter() - start
        for s in valid:
            pred = segment(unet, s["images"], settings.seg_size, roi=s.get("roi"))[0]
            dice_rows.append({"uid": s["uid"], "fold": k, **dice_per_vertebra(pred, s["mask"])})
            found = {"unet3d": slice_targets(pred)[0]}
            if slice_models:
                rf_prob = np.stack([p[:, 1] if p.shape[1] > 1 else np.zeros(len(p))
                                    for p in rf.predict_proba(rf_features(s["images"], settings.rf_pixels))], axis=1)
                cnn_prob = 1 / (1 + np.exp(-predict(cnn, SliceDataset([{"images": s["images"]}]))))
                seq_prob = sequence_probabilities(head, feats[s["uid"]])
                found["cnn_bigru"] = seq_prob >= 0.5
                for z in range(len(s["images"])):
                    slice_rows.append({"uid": s["uid"], "fold": k, "z": z,
                                       **{f"true_C{j}": bool(s["presence"][z, j - 1]) for j in CERVICAL},
                                       **{f"rf_C{j}": float(rf_prob[z, j - 1]) for j in CERVICAL},
                                       **{f"cnn_C{j}": float(cnn_prob[z, j - 1]) for j in CERVICAL},
                                       **{f"seq_C{j}": float(seq_prob[z, j - 1]) for j in CERVICAL}})
            truth = ranges_from_presence(s["presence"])
            for source, presence in found.items():
                range_rows += range_errors(enforce_order(ranges_from_presence(presence))[0], truth,
                                           uid=s["uid"], fold=k, source=source)
    return {"slices": pd.DataFrame(slice_rows), "dice": pd.DataFrame(dice_rows),
            "ranges": pd.DataFrame(range_rows), "histories": pd.concat(histories, ignore_index=True),
            "folds": folds, "seconds": seconds}


def range_errors(pred: dict, truth: dict, **keys) -> list[dict]:
    """Rows of |first| and |last| slice errors of predicted vertebra ranges (nan where one is missed)."""
    rows = []
    for k in CERVICAL:
        if truth[k] is None:
            continue
        p = pred[k]
        first, last = (abs(p[0] - truth[k][0]), abs(p[1] - truth[k][1])) if p is not None else (np.nan, np.nan)
        rows.append({**keys, "vertebra": f"C{k}", "first_error": first, "last_error": last})
    return rows


def range_table(ranges: pd.DataFrame) -> pd.DataFrame:
    """Per source: mean |first| and |last| errors in slices, share of vertebrae within one slice at both ends,
    share missed; the best source first: fewest missed, then the lowest mean error (held-out studies)."""
    worst = ranges[["first_error", "last_error"]].max(axis=1)
    table = ranges.assign(within_1=worst <= 1, missed=worst.isna()).groupby("source").agg(
        first_error=("first_error", "mean"), last_error=("last_error", "mean"), within_1=("within_1", "mean"),
        missed=("missed", "mean"))
    table["mean_error"] = table[["first_error", "last_error"]].mean(axis=1)
    return table.sort_values(["missed", "mean_error"])


def best_range_source(cv: dict) -> str:
    """The range source of `range_table`'s first row: the one closest to the truth out of fold."""
    return str(range_table(cv["ranges"]).index[0])


def accuracy_table(slices: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Seed 000's table: per-slice accuracy of each vertebra label, and overall (their mean), RF vs CNN, and the
    CNN with the BiGRU over its features (when `slices` has its columns)."""
    rows = {}
    models = (("rf", "Random Forest"), ("cnn", "CNN"), ("seq", "CNN + BiGRU"))
    for model, name in (m for m in models if f"{m[0]}_C1" in slices):
        acc = {v: float(((slices[f"{model}_{v}"] >= threshold) == slices[f"true_{v}"]).mean()) for v in VERTEBRAE}
        acc["Overall"] = float(np.mean(list(acc.values())))
        rows[name] = acc
    return pd.DataFrame(rows)
