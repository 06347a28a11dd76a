"""Vertebra localisation (notebook 02): per-slice classifiers (RandomForest, timm CNN) as in seed 000, a MONAI 3D
UNet as the winners do, cross-validated over the segmented studies, then ranges, boxes and masks for every study.

Outputs under `WORK_DIR/localisation/`: `vertebrae.csv` (one row per study and vertebra) and `masks/<uid>.npz`
(uint8 [Z, S, S] on the cache grid) for `03_cnn_lstm` and `04_vit`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
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
    probabilities_to_grid,
    rf_features,
    to_cube,
)
from kernel_utils.stages.vertebra_targets import (
    CERVICAL,
    box_of,
    enforce_order,
    ranges_from_presence,
    slice_targets,
)
from kernel_utils.training import TrainConfig, device, fit, load_best, predict

log = logging.getLogger(__name__)
VERTEBRAE = [f"C{k}" for k in CERVICAL]


@dataclass(frozen=True)
class LocalisationSettings:
    """Sizes of the localisation stage; `for_profile` gives the kit's choices per profile."""

    n_folds: int
    slice_cfg: TrainConfig
    seg_cfg: TrainConfig
    seg_size: int
    rf_trees: int = 100
    rf_pixels: int = 16

    @property
    def sequence_cfg(self) -> TrainConfig:
        """The BiGRU over the slice classifier's features; its run name follows the classifier's."""
        return TrainConfig(stage="slice_sequence", model="bigru", epochs=25, batch_size=1, lr=2e-3, patience=6,
                           max_steps_per_epoch=self.slice_cfg.max_steps_per_epoch,
                           params=(("features", self.slice_cfg.run_name), ("hidden", 64)))

    @staticmethod
    def for_profile(profile: str, slice_model: str = "tf_efficientnetv2_b0", pretrained_path: str = "") -> \
            LocalisationSettings:
        table = {  # folds, cnn epochs, cnn steps cap, seg size, seg width, seg epochs, seg batch
            "smoke": (2, 1, 4, 32, 8, 2, 2),
            "demo": (3, 2, 0, 32, 8, 25, 2),
            "bench": (5, 4, 0, 96, 16, 60, 2),  # 96^3: Dice 0.894 vs 0.818 at 64^3 (CPU pilot, 2 folds)
            "full": (5, 8, 0, 128, 32, 150, 2),
        }
        folds, ep, steps, size, width, seg_ep, seg_bs = table[profile]
        slice_cfg = TrainConfig(stage="slice_classifier", model=slice_model, epochs=ep, batch_size=32, lr=1e-3,
                                patience=3, max_steps_per_epoch=steps, pretrained_path=pretrained_path)
        seg_cfg = TrainConfig(stage="seg3d", model="monai_unet", epochs=seg_ep, batch_size=seg_bs, lr=3e-3,
                              patience=max(seg_ep // 4, 2), max_steps_per_epoch=steps,
                              params=(("size", size), ("width", width)))
        return LocalisationSettings(folds, slice_cfg, seg_cfg, size)


def slice_features(cnn, images: np.ndarray) -> np.ndarray:
    """The slice classifier's pooled backbone features of every slice: uint8 [Z, S, S, C] -> float32 [Z, F]."""
    return predict(cnn.backbone, SliceDataset([{"images": images}]))


def sequence_probabilities(head, features: np.ndarray) -> np.ndarray:
    """P(C1..C7 on each slice) through the BiGRU: a study's slice features float32 [Z, F] -> float32 [Z, 7]."""
    logits = predict(head, FeatureSequences([features]), batch_size=1)[0]
    return 1 / (1 + np.exp(-logits))


@dataclass
class SliceModel:
    """One fold's slice classifier and the BiGRU over its features."""

    cnn: torch.nn.Module
    head: torch.nn.Module

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 [Z, S, S, C] -> P(C1..C7 on each slice) float32 [Z, 7]."""
        return sequence_probabilities(self.head, slice_features(self.cnn, images))


def load_localisation_models(settings: LocalisationSettings, models_dir: str | os.PathLike, channels: int,
                             n_folds: int) -> tuple[list[torch.nn.Module], list[SliceModel]]:
    """The best checkpoints of every fold: (3D UNets, slice models), as notebook 02 trained them."""
    unets, slice_models = [], []
    for k in range(n_folds):
        unets.append(load_best(create_model(settings.seg_cfg, channels), models_dir, settings.seg_cfg, k))
        cnn = load_best(create_model(settings.slice_cfg, channels), models_dir, settings.slice_cfg, k)
        head = create_model(settings.sequence_cfg, cnn.backbone.num_features)
        slice_models.append(SliceModel(cnn, load_best(head, models_dir, settings.sequence_cfg, k)))
    return unets, slice_models


def study_folds(uids: list[str], n_folds: int, seed: int = 42) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uids))
    return {uids[i]: int(k % n_folds) for k, i in enumerate(order)}


def cross_validate(studies: list[dict], settings: LocalisationSettings, out_dir: str | os.PathLike,
                   progress: bool = True, slice_models: bool = True) -> dict:
    """Train and score RF, CNN and 3D UNet over folds of the segmented studies.

    Args:
        studies: dicts with uid, images uint8 [Z, S, S, C], mask uint8 [Z, S, S].
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
        hist = fit(unet, VolumeDataset(train, settings.seg_size, augment=True), VolumeDataset(valid, settings.seg_size),
                   dice_ce_loss, settings.seg_cfg, out_dir, k, progress=progress)
        histories.append(hist.assign(model="unet3d", fold=k))
        unet = load_best(unet, out_dir, settings.seg_cfg, k)
        seconds["unet3d"] += time.perf_counter() - start
        for s in valid:
            pred = segment(unet, s["images"], settings.seg_size)[0]
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


def drop_islands(prob: torch.Tensor) -> torch.Tensor:
    """float [K, D, H, W] class probabilities -> a copy where each vertebra's voxels outside its largest connected
    component (of the argmax) have that class's probability set to 0, so they go to the next class, mostly
    background. A vertebra is one bone: a second island of C3 is a false positive."""
    prob = prob.clone()
    labels = prob.argmax(dim=0).numpy()
    for c in CERVICAL:
        components, n = ndimage.label(labels == c)
        if n > 1:
            largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
            prob[c][torch.from_numpy((components > 0) & (components != largest))] = 0
    return prob


@torch.no_grad()
def segment(models, images: np.ndarray, size: int, flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Fold-averaged softmax of one or more 3D UNets over a study, with the left-right flip averaged in when `flip`
    (the UNet trains with that flip), and each vertebra kept to its largest island (`drop_islands`). On the bench
    pilot at 96^3 (65 held-out studies, 2 folds): mean Dice 0.8945 plain, 0.8973 with the flip, 0.9014 with both.

    Returns:
        labels uint8 [Z, S, S] on the cache grid (`probabilities_to_grid`), and confidence float32 [8] (mean
        winning probability of each class over the voxels it wins, at the network's resolution).
    """
    models = models if isinstance(models, list | tuple) else [models]
    dev = device()
    x = to_cube(images, size)[None].to(dev)
    views = [x, x.flip(-1)] if flip else [x]
    prob = 0
    for m in models:
        m = m.to(dev).eval()
        for i, view in enumerate(views):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                p = torch.softmax(m(view).float(), dim=1)[0]
            prob = prob + (p.flip(-1) if i else p)
    prob = drop_islands((prob / (len(models) * len(views))).cpu())
    win, labels = prob.max(dim=0)
    conf = np.array([float(win[labels == c].mean()) if (labels == c).any() else 0.0 for c in range(8)],
                    dtype=np.float32)
    return probabilities_to_grid(prob, images.shape[:3]), conf


def localise_study(mask: np.ndarray, confidence: np.ndarray, slice_numbers: np.ndarray,
                   original_shape: tuple[int, int, int], crop_box: tuple[int, int, int, int] | None,
                   source: str, presence: np.ndarray | None = None) -> tuple[list[dict], list[str]]:
    """Per-vertebra rows of one study from its mask on the cache grid, after the consistency repairs.

    Args:
        mask: uint8 [Z, S, S] labels on the cache grid.
        confidence: float [8] per class (index k for Ck).
        slice_numbers: [Z] file slice numbers, head first.
        original_shape: (Z, H, W) of the DICOM series.
        crop_box: (y0, y1, x0, x1) in original pixels when the cache was cropped, else None.
        source: which model made the ranges.
        presence: bool [Z, 7] the slices of each vertebra when another model than the mask's says them (the
            mask then gives only the in-plane boxes); None: from the mask.

    Returns:
        Rows with vertebra, found, first/last (head-first index), first/last_slice_number, box y0..x1 on the
        cache grid and orig_y0..orig_x1 in DICOM pixels, confidence, source; and the repairs made.
    """
    presence = slice_targets(mask)[0] if presence is None else presence
    ranges, repairs = enforce_order(ranges_from_presence(presence))
    size_y, size_x = mask.shape[1:]
    oy0, oy1, ox0, ox1 = crop_box if crop_box is not None else (0, original_shape[1], 0, original_shape[2])
    sy, sx = (oy1 - oy0) / size_y, (ox1 - ox0) / size_x
    rows = []
    for k in CERVICAL:
        r = ranges[k]
        row = {"vertebra": f"C{k}", "found": r is not None, "source": source,
               "confidence": float(confidence[k]) if r is not None else 0.0}
        if r is not None:
            first, last = max(r[0], 0), min(r[1], len(mask) - 1)
            box = box_of(mask, k, first, last) or box_of(mask, k, 0, len(mask) - 1) or (0, size_y, 0, size_x)
            row.update(first=first, last=last, first_slice_number=int(slice_numbers[first]),
                       last_slice_number=int(slice_numbers[last]), y0=box[0], y1=box[1], x0=box[2], x1=box[3],
                       orig_y0=int(oy0 + round(box[0] * sy)), orig_y1=int(oy0 + round(box[1] * sy)),
                       orig_x0=int(ox0 + round(box[2] * sx)), orig_x1=int(ox0 + round(box[3] * sx)))
        rows.append(row)
    return rows, repairs


def presence_confidence(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """P(Ck) [Z, 7] -> float32 [8] (index k for Ck): the mean probability over the slices called present."""
    conf = np.zeros(8, dtype=np.float32)
    for j in range(7):
        on = prob[:, j] >= threshold
        conf[j + 1] = float(prob[on, j].mean()) if on.any() else 0.0
    return conf


def presence_mask(prob: np.ndarray, shape: tuple[int, int, int], threshold: float = 0.5) -> np.ndarray:
    """Slice-classifier fallback: a mask whose slices carry label k where P(Ck) >= threshold (whole slice)."""
    mask = np.zeros(shape, dtype=np.uint8)
    for k in CERVICAL:  # later (lower) vertebrae win where two overlap, as in the ranges
        mask[prob[:, k - 1] >= threshold] = k
    return mask


def localise_all(studies, unets: list, slice_models: list[SliceModel], folds: dict[str, int],
                 settings: LocalisationSettings, out_dir: str | os.PathLike, crop: bool = False,
                 range_source: str = "unet3d", progress: bool = True) -> pd.DataFrame:
    """Ranges, boxes and masks for every study; writes `vertebrae.csv` and `masks/<uid>.npz` under out_dir.

    Args:
        studies: iterable of (split, uid, cache entry) for every train and test study.
        unets, slice_models: the fold models (`load_localisation_models`); a segmented study is predicted by the
            models of its held-out fold only; the slice models (CNN + BiGRU) stand in where the 3D model finds
            nothing.
        folds: uid -> fold of the segmented studies.
        range_source: "unet3d" (slice ranges from the 3D mask) or "cnn_bigru" (from the slice models; the 3D
            mask gives the boxes); `range_table` of the cross-validation says which is closer to the truth.

    Returns:
        One row per study and vertebra (see `localise_study`), plus split, uid, no_cervical and repairs.
    """
    out_dir = Path(out_dir)
    rows = []
    for split, uid, entry in tqdm(studies, desc="localise studies", disable=not progress):
        pick = [folds[uid]] if uid in folds else list(range(len(unets)))
        mask, conf = segment([unets[i] for i in pick], entry["images"], settings.seg_size)
        source = "unet3d" + ("_oof" if uid in folds else "")
        if not ((mask >= 1) & (mask <= 7)).any():  # the 3D model found nothing: the slice classifier may
            prob = np.mean([slice_models[i].probabilities(entry["images"]) for i in pick], axis=0)
            mask = presence_mask(prob, entry["images"].shape[:3])
            conf = presence_confidence(prob)
            source = "slice_cnn_bigru"
        presence = None
        if range_source == "cnn_bigru" and source != "slice_cnn_bigru":
            prob = np.mean([slice_models[i].probabilities(entry["images"]) for i in pick], axis=0)
            presence, conf = prob >= 0.5, presence_confidence(prob)
            source = "cnn_bigru+" + source
        crop_box = tuple(int(v) for v in entry["crop_box"]) if crop else None
        study_rows, repairs = localise_study(mask, conf, entry["slice_numbers"], tuple(entry["original_shape"]),
                                             crop_box, source, presence)
        for r in repairs:  # logged at INFO: the table's `repairs` column keeps them, the notebook counts them
            log.info("%s: %s", uid, r)
        no_cervical = not any(r["found"] for r in study_rows)
        if no_cervical:
            log.warning("%s: no cervical vertebra found; later stages use the whole study", uid)
        for r in study_rows:
            rows.append({"split": split, "StudyInstanceUID": uid, **r, "no_cervical": no_cervical,
                         "repairs": "; ".join(repairs)})
        write_localisation(out_dir / "masks", uid, mask)
    table = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".vertebrae.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, out_dir / "vertebrae.csv")
    return table


def write_localisation(masks_dir: Path, uid: str, mask: np.ndarray) -> None:
    """The mask npz of one study, atomically."""
    masks_dir.mkdir(parents=True, exist_ok=True)
    path = masks_dir / f"{uid}.npz"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, mask=mask)
    os.replace(tmp, path)


def save_localisation_meta(out_dir: str | os.PathLike, settings: LocalisationSettings, n_folds: int,
                           range_source: str = "unet3d") -> Path:
    """`localisation.json`: the configs, the number of folds trained and the range source chosen out of fold,
    for inference without notebook 02."""
    path = Path(out_dir) / "localisation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"slice_cfg": settings.slice_cfg.to_json(), "seg_cfg": settings.seg_cfg.to_json(),
                                "seg_size": settings.seg_size, "n_folds": n_folds, "range_source": range_source},
                               indent=1, default=str))
    return path
