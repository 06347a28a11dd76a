"""Applying notebook 02's fold models to a study: the 3D UNet's mask (the slice classifier with its BiGRU where the
UNet finds nothing), then ranges and boxes of C1..C7 after the anatomical repairs. `localise_all` writes every
study's result to the work folder (training); a `Localiser` returns one study's in memory (test inference).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from kernel_utils.layout import WorkLayout, atomic_file, layout_of, read_json, write_csv, write_json
from kernel_utils.nets import create_model
from kernel_utils.stages.localisation_data import (
    Box,
    FeatureSequences,
    SliceDataset,
    probabilities_to_grid,
    to_cube,
)
from kernel_utils.stages.localisation_settings import LocalisationSettings
from kernel_utils.stages.study_localisation import StudyLocalisation
from kernel_utils.stages.vertebra_targets import CERVICAL, box_of, enforce_order, ranges_from_presence, slice_targets
from kernel_utils.training import device, load_best, predict

log = logging.getLogger(__name__)


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
        head = create_model(settings.sequence_cfg, cnn.backbone.pooled_features)
        slice_models.append(SliceModel(cnn, load_best(head, models_dir, settings.sequence_cfg, k)))
    return unets, slice_models


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
def segment(models, images: np.ndarray, size: int, flip: bool = True,
            roi: Box | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fold-averaged softmax of one or more 3D UNets over a study (the cube cut from its in-plane `roi` when given),
    with the left-right flip averaged in when `flip` (the UNet trains with that flip), and each vertebra kept to its
    largest island (`drop_islands`).

    Returns:
        labels uint8 [Z, S, S] on the cache grid (`probabilities_to_grid`), and confidence float32 [8] (mean
        winning probability of each class over the voxels it wins, at the network's resolution).
    """
    models = models if isinstance(models, list | tuple) else [models]
    dev = device()
    x = to_cube(images, size, roi)[None].to(dev)
    views = torch.cat([x, x.flip(-1)]) if flip else x  # one batch of both views: cheaper than two forwards
    prob = 0
    for m in models:
        m = m.to(dev).eval()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            p = torch.softmax(m(views).float(), dim=1)
        prob = prob + p[0] + (p[1].flip(-1) if flip else 0)
    prob = drop_islands((prob / (len(models) * len(views))).cpu())
    win, labels = prob.max(dim=0)
    conf = np.array([float(win[labels == c].mean()) if (labels == c).any() else 0.0 for c in range(8)],
                    dtype=np.float32)
    return probabilities_to_grid(prob, images.shape[:3], roi=roi), conf


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


def localise_entry(entry: dict, unets: list, slice_models: list[SliceModel], settings: LocalisationSettings,
                   crop: bool = False, range_source: str = "unet3d", held_out: bool = False,
                   uid: str = "") -> tuple[list[dict], np.ndarray]:
    """One study's localisation: (rows of `localise_study` plus no_cervical and repairs, mask uint8 [Z, S, S]).

    unets, slice_models: the fold models to average (a segmented study: its held-out fold's only, `held_out`);
    the slice models (CNN + BiGRU) stand in where the 3D model finds nothing.
    range_source: "unet3d" (slice ranges from the 3D mask) or "cnn_bigru" (from the slice models; the 3D mask gives
    the boxes); `range_table` of the cross-validation says which is closer to the truth.
    """
    mask, conf = segment(unets, entry["images"], settings.seg_size, roi=settings.seg_roi(entry, crop))
    source = "unet3d" + ("_oof" if held_out else "")
    if not ((mask >= 1) & (mask <= 7)).any():  # the 3D model found nothing: the slice classifier may
        prob = np.mean([m.probabilities(entry["images"]) for m in slice_models], axis=0)
        mask = presence_mask(prob, entry["images"].shape[:3])
        conf = presence_confidence(prob)
        source = "slice_cnn_bigru"
    presence = None
    if range_source == "cnn_bigru" and source != "slice_cnn_bigru":
        prob = np.mean([m.probabilities(entry["images"]) for m in slice_models], axis=0)
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
    rows = [{**r, "no_cervical": no_cervical, "repairs": "; ".join(repairs)} for r in study_rows]
    return rows, mask


def localise_all(studies, unets: list, slice_models: list[SliceModel], folds: dict[str, int],
                 settings: LocalisationSettings, work_dir: str | os.PathLike | WorkLayout, crop: bool = False,
                 range_source: str = "unet3d", progress: bool = True) -> pd.DataFrame:
    """Ranges, boxes and masks for every study (`localise_entry`); writes `localisation/vertebrae.csv` and
    `localisation/masks/<uid>.npz`.

    Args:
        studies: iterable of (split, uid, cache entry) for every train and test study.
        folds: uid -> fold of the segmented studies: each is localised by the models of its held-out fold only.

    Returns:
        One row per study and vertebra (see `localise_study`), plus split, uid, no_cervical and repairs.
    """
    layout = layout_of(work_dir)
    rows = []
    for split, uid, entry in tqdm(studies, desc="localise studies", disable=not progress):
        pick = [folds[uid]] if uid in folds else list(range(len(unets)))
        study_rows, mask = localise_entry(entry, [unets[i] for i in pick], [slice_models[i] for i in pick],
                                          settings, crop, range_source, uid in folds, uid)
        rows += [{"split": split, "StudyInstanceUID": uid, **r} for r in study_rows]
        write_localisation(layout.masks, uid, mask)
    table = pd.DataFrame(rows)
    write_csv(layout.vertebrae, table)
    return table


def write_localisation(masks_dir: Path, uid: str, mask: np.ndarray) -> None:
    """The mask npz of one study, atomically; left untouched when it already holds this mask, so a rerun of notebook
    02 that finds the same masks keeps the inputs and fold models made from them (`StudyLocalisation.fingerprint`)."""
    path = Path(masks_dir) / f"{uid}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                if np.array_equal(f["mask"], mask):
                    return
        except Exception:  # unreadable: written again below
            pass
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, mask=mask)


def save_localisation_meta(work_dir: str | os.PathLike | WorkLayout, settings: LocalisationSettings, n_folds: int,
                           range_source: str = "unet3d") -> Path:
    """`localisation/localisation.json`: the settings, the number of folds trained and the range source chosen
    out of fold, for inference without notebook 02."""
    layout = layout_of(work_dir)
    write_json(layout.localisation_meta, {"settings": settings.to_json(), "n_folds": n_folds,
                                          "range_source": range_source})
    return layout.localisation_meta


class Localiser:
    """Notebook 02's fold models at inference, from `localisation/localisation.json`: `localise(uid, entry)` gives
    one study's StudyLocalisation in memory (the average of every fold's models)."""

    def __init__(self, work_dir: str | os.PathLike | WorkLayout, channels: int, crop: bool):
        layout = layout_of(work_dir)
        meta = read_json(layout.localisation_meta)
        self.settings = LocalisationSettings.from_json(meta["settings"])
        self.range_source, self.crop = meta.get("range_source", "unet3d"), crop
        self.unets, self.slice_models = load_localisation_models(self.settings, layout.localisation_models,
                                                                 channels, int(meta["n_folds"]))

    def localise(self, uid: str, entry: dict) -> StudyLocalisation:
        rows, mask = localise_entry(entry, self.unets, self.slice_models, self.settings, self.crop,
                                    self.range_source, uid=uid)
        return StudyLocalisation(pd.DataFrame(rows).assign(StudyInstanceUID=uid), mask)
