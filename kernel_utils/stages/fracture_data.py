"""Inputs of the fracture models, built from the cache and the localisation of notebook 02.

Per vertebra (the winners' form): for each of C1..C7, N slices evenly spaced through its range, each a 2.5D stack
(neighbouring slices of one window as channels, plus the vertebra's mask), cropped to the vertebra's box and
resized: uint8 [7, N, 2 * context + 2, crop, crop]. A vertebra that was not found falls back to the k-th of seven
even windows of the whole study. Study level (seed 002): N slices evenly spaced through the study, three windows,
cropped to the Otsu box: uint8 [N, 3, size, size].
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from kernel_utils.metric import TARGETS


def evenly_spaced(first: int, last: int, n: int) -> np.ndarray:
    """n slice indices evenly spaced from first to last inclusive (repeats when the range is short)."""
    return np.rint(np.linspace(first, last, n)).astype(int)


def square_box(y0: int, y1: int, x0: int, x1: int, margin: float, h: int, w: int) -> tuple[int, int, int, int]:
    """A square of the box's longer side plus `margin` on each side, about its centre, moved inside [h, w]."""
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    side = max(y1 - y0, x1 - x0) * (1 + 2 * margin)
    side = max(side, 8)
    y0, y1 = int(round(cy - side / 2)), int(round(cy + side / 2))
    x0, x1 = int(round(cx - side / 2)), int(round(cx + side / 2))
    dy = max(0, -y0) - max(0, y1 - h)
    dx = max(0, -x0) - max(0, x1 - w)
    return max(y0 + dy, 0), min(y1 + dy, h), max(x0 + dx, 0), min(x1 + dx, w)


def vertebra_stacks(images: np.ndarray, mask: np.ndarray | None, ranges: pd.DataFrame | None, n_slices: int = 15,
                    context: int = 1, step: int = 1, crop: int = 64, channel: int = 1,
                    margin: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """The per-vertebra input of one study.

    Args:
        images: uint8 [Z, S, S, C] cached windows; `channel` picks the window used for the 2.5D stack.
        mask: uint8 [Z, S, S] vertebra labels on the cache grid (from notebook 02), or None.
        ranges: that study's rows of `vertebrae.csv` (vertebra, found, first, last, y0, y1, x0, x1), or None.
        n_slices, context, step: N slices per vertebra; neighbours at offsets -context..context times step.
        crop: output side in pixels.

    Returns:
        uint8 [7, N, 2 * context + 2, crop, crop], the slice indices used, int [7, N], and each vertebra's
        crop box on the cache grid (y0, y1, x0, x1), int [7, 4].
    """
    z_n, h, w = images.shape[:3]
    offsets = np.arange(-context, context + 1) * step
    out = np.zeros((7, n_slices, len(offsets) + 1, crop, crop), dtype=np.uint8)
    used = np.zeros((7, n_slices), dtype=int)
    boxes = np.zeros((7, 4), dtype=int)
    rows = ranges.set_index("vertebra") if ranges is not None and len(ranges) else None
    for k in range(1, 8):
        row = rows.loc[f"C{k}"] if rows is not None and f"C{k}" in rows.index else None
        if row is not None and bool(row["found"]):
            zs = evenly_spaced(int(row["first"]), int(row["last"]), n_slices)
            y0, y1, x0, x1 = square_box(int(row["y0"]), int(row["y1"]), int(row["x0"]), int(row["x1"]), margin, h, w)
        else:  # fallback: the k-th of seven even windows of the whole study, whole slices
            lo, hi = (k - 1) * z_n // 7, max(k * z_n // 7 - 1, (k - 1) * z_n // 7)
            zs = evenly_spaced(lo, hi, n_slices)
            y0, y1, x0, x1 = 0, h, 0, w
        used[k - 1] = zs
        boxes[k - 1] = (y0, y1, x0, x1)
        for i, z in enumerate(zs):
            planes = [images[int(np.clip(z + o, 0, z_n - 1)), y0:y1, x0:x1, channel] for o in offsets]
            planes.append(((mask[z, y0:y1, x0:x1] == k) * 255).astype(np.uint8) if mask is not None
                          else np.zeros_like(planes[0]))
            stack = cv2.resize(np.stack(planes, axis=-1), (crop, crop), interpolation=cv2.INTER_AREA)
            out[k - 1, i] = stack.reshape(crop, crop, -1).transpose(2, 0, 1)
    return out, used, boxes


def entry_meta(entry: dict) -> dict:
    """What a study's input meta takes from its cache entry: slice_numbers, cache_size (S, S), original_size (H, W)."""
    return {"slice_numbers": entry["slice_numbers"], "cache_size": tuple(entry["images"].shape[1:3]),
            "original_size": tuple(int(v) for v in entry["original_shape"][1:])}


def study_slices(z_n: int, n_slices: int) -> np.ndarray:
    """The slice indices the study-level form samples from a study of z_n slices, int [N]."""
    return evenly_spaced(0, z_n - 1, n_slices)


def study_sequence(images: np.ndarray, crop_box: tuple[int, int, int, int] | None, n_slices: int = 32,
                   size: int = 64) -> np.ndarray:
    """Seed 002's input: n_slices evenly spaced slices, three windows, cropped to crop_box (cache pixels).

    Returns:
        uint8 [N, C, size, size].
    """
    return crop_slices(images, crop_box, study_slices(images.shape[0], n_slices), size)


def crop_slices(images: np.ndarray, crop_box: tuple[int, int, int, int] | None, zs: np.ndarray,
                size: int) -> np.ndarray:
    """The slices zs of cached windows [Z, S, S, C], each cropped to crop_box and resized: uint8 [len(zs), C, size,
    size]."""
    h, w = images.shape[1:3]
    y0, y1, x0, x1 = crop_box if crop_box is not None else (0, h, 0, w)
    out = np.empty((len(zs), images.shape[3], size, size), dtype=np.uint8)
    for i, z in enumerate(zs):
        img = cv2.resize(np.ascontiguousarray(images[z, y0:y1, x0:x1]), (size, size), interpolation=cv2.INTER_AREA)
        out[i] = img.reshape(size, size, -1).transpose(2, 0, 1)
    return out


def crop_box_on_cache(entry: dict) -> tuple[int, int, int, int]:
    """The Otsu box of a cache entry in cache pixels (it is stored in original pixels)."""
    y0, y1, x0, x1 = (int(v) for v in entry["crop_box"])
    _, h, w = (int(v) for v in entry["original_shape"])
    s_h, s_w = entry["images"].shape[1:3]
    return (int(y0 * s_h / h), max(int(np.ceil(y1 * s_h / h)), int(y0 * s_h / h) + 1),
            int(x0 * s_w / w), max(int(np.ceil(x1 * s_w / w)), int(x0 * s_w / w) + 1))


class FractureDataset(Dataset):
    """Inputs uint8 [..., C, H, W] with wide targets [8] (or [1] for single vertebrae) and optional per-slice
    labels [N] (nan where unknown; `slice_target` of an item); augmentation: left-right flip, small rotation and
    shift (one transform per sample, all slices alike; off with rotate_shift=False), intensity jitter of the
    image channels."""

    def __init__(self, inputs: list[np.ndarray], targets: np.ndarray | None, augment: bool = False,
                 image_channels: int | None = None, rotate_shift: bool = True,
                 slice_targets: np.ndarray | None = None):
        self.inputs, self.targets, self.augment = inputs, targets, augment
        self.image_channels, self.rotate_shift = image_channels, rotate_shift
        self.slice_targets = slice_targets

    def __len__(self) -> int:
        return len(self.inputs)

    def _augment(self, x: np.ndarray) -> np.ndarray:
        rng = np.random  # the global stream: seeded by the training loop, and per DataLoader worker
        if not self.rotate_shift:
            return np.ascontiguousarray(x[..., ::-1]) if rng.random() < 0.5 else x
        shape = x.shape
        side = shape[-1]
        planes = x.reshape(-1, side, side).transpose(1, 2, 0)  # [H, W, everything else]
        angle, shift = rng.uniform(-10, 10), rng.uniform(-0.06, 0.06, size=2) * side
        m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
        m[:, 2] += shift
        out = np.empty_like(planes)
        for i in range(0, planes.shape[2], 4):  # cv2 warps at most 4 channels at a time
            part = np.ascontiguousarray(planes[..., i: i + 4])
            warped = cv2.warpAffine(part, m, (side, side), flags=cv2.INTER_LINEAR, borderValue=0)
            out[..., i: i + 4] = warped.reshape(side, side, -1)
        x = out.transpose(2, 0, 1).reshape(shape)
        if rng.random() < 0.5:
            x = x[..., ::-1]
        return np.ascontiguousarray(x)

    def __getitem__(self, i: int) -> dict:
        x = self.inputs[i]
        if self.augment:
            x = self._augment(x)
        t = torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0
        if self.augment:
            c = self.image_channels or t.shape[-3]
            gain = 1 + 0.1 * (2 * torch.rand(1) - 1)
            bias = 0.05 * (2 * torch.rand(1) - 1)
            t[..., :c, :, :] = (t[..., :c, :, :] * gain + bias).clamp(0, 1)
        item = {"image": t}
        if self.targets is not None:
            item["target"] = torch.from_numpy(self.targets[i].astype(np.float32))
        if self.slice_targets is not None:
            item["slice_target"] = torch.from_numpy(self.slice_targets[i].astype(np.float32))
        return item


def boxed_slice_numbers(boxes: pd.DataFrame) -> dict[str, set[int]]:
    """uid -> the slice numbers `train_bounding_boxes.csv` boxes in that study."""
    return {uid: set(part.slice_number.astype(int)) for uid, part in boxes.groupby("StudyInstanceUID")}


def study_slice_labels(slice_numbers: np.ndarray, fractured: np.ndarray, boxed: set[int],
                       ranges: pd.DataFrame | None = None) -> np.ndarray:
    """Image-level labels of every slice of one study, float32 [Z]: 1 on a fractured slice, 0 where no fracture can
    be, nan where nobody knows.

    fractured: bool [8], train.csv's C1..C7 and patient_overall; boxed: the slice numbers `train_bounding_boxes.csv`
    boxes; ranges: the study's rows of notebook 02's `vertebrae.csv` (vertebra, found, first_slice_number,
    last_slice_number), or None. A healthy study: 0. A boxed study: 1 on its boxed slices, 0 elsewhere. A fractured
    study without boxes, given its ranges: 1 within a found fractured vertebra, 0 elsewhere when every fractured
    vertebra was found (nan when one was not); without ranges: nan."""
    numbers = np.asarray(slice_numbers)
    if not fractured[7]:
        return np.zeros(len(numbers), np.float32)
    if boxed:
        return np.isin(numbers, list(boxed)).astype(np.float32)
    out = np.full(len(numbers), np.nan, np.float32)
    if ranges is None or not len(ranges):
        return out
    rows = ranges.set_index("vertebra")
    inside = np.zeros(len(numbers), bool)
    all_found = True
    for k in np.flatnonzero(fractured[:7]):
        row = rows.loc[f"C{k + 1}"] if f"C{k + 1}" in rows.index else None
        if row is None or not bool(row["found"]):
            all_found = False
            continue
        lo, hi = sorted((int(row["first_slice_number"]), int(row["last_slice_number"])))
        inside |= (numbers >= lo) & (numbers <= hi)
    if all_found:
        out[:] = 0
    out[inside] = 1
    return out


def slice_targets_of(uids: list[str], metas: list[dict], labels: pd.DataFrame, boxes: pd.DataFrame,
                     ranges: dict[str, pd.DataFrame] | None = None) -> np.ndarray:
    """Image-level labels of the sampled slices, float32 [S, *used.shape]: 1 where a fracture is, 0 where no
    fracture can be, nan where nobody knows.

    Study form (`used` [N], seed 002 trains its CNN on these first): `study_slice_labels` of the sampled slices;
    `ranges` (uid -> its rows of `vertebrae.csv`) labels the fractured studies without boxes from their vertebrae.
    Per-vertebra form (`used` [7, N], the auxiliary per-slice target): 0 on every slice of a vertebra labelled
    healthy (boxes or not); a fractured vertebra of a boxed study gets its boxed slices 1 and the others 0; nan
    for a fractured vertebra without boxes, or whose sampled slices miss every box (localisation missed it).

    metas: `build_inputs` metas (`used`: the sampled slice indices, `slice_numbers`)."""
    shape = np.shape(metas[0]["used"]) if metas else (0,)
    if len(shape) == 1:
        every = all_slice_labels(uids, metas, labels, boxes, ranges)
        return np.stack([z[meta["used"]] for z, meta in zip(every, metas, strict=True)]) if metas else \
            np.zeros((0, 0), np.float32)
    table = labels.set_index("StudyInstanceUID")
    boxed = boxed_slice_numbers(boxes)
    out = np.full((len(uids), *shape), np.nan, dtype=np.float32)
    columns = [f"C{k}" for k in range(1, 8)]
    for i, (uid, meta) in enumerate(zip(uids, metas, strict=True)):
        numbers = np.asarray(meta["slice_numbers"])[meta["used"]]
        hit = np.isin(numbers, list(boxed.get(uid, ()))).astype(np.float32)
        fractured = table.loc[uid, columns].to_numpy(bool) if uid in table.index else np.ones(7, bool)
        known_fracture = hit.any(axis=1) if uid in boxed else np.zeros(7, bool)  # [7]: only where a box is sampled
        out[i] = np.where(~fractured[:, None], 0, np.where(known_fracture[:, None], hit, np.nan))
    return out


def all_slice_labels(uids: list[str], metas: list[dict], labels: pd.DataFrame, boxes: pd.DataFrame,
                     ranges: dict[str, pd.DataFrame] | None = None) -> list[np.ndarray]:
    """`study_slice_labels` of every slice of each study (a study missing from train.csv: unknown), float32 [Z]
    each."""
    table = labels.set_index("StudyInstanceUID").reindex(columns=TARGETS)  # without C1..C7: ranges cannot label
    if table[TARGETS[:7]].isna().all().any():
        ranges = None
    boxed = boxed_slice_numbers(boxes)
    out = []
    for uid, meta in zip(uids, metas, strict=True):
        if uid not in table.index:
            out.append(np.full(len(meta["slice_numbers"]), np.nan, np.float32))
            continue
        fractured = table.loc[uid].fillna(0).to_numpy(bool)
        out.append(study_slice_labels(meta["slice_numbers"], fractured, boxed.get(uid, set()),
                                      None if ranges is None else ranges.get(uid)))
    return out


def targets_of(labels: pd.DataFrame, uids: list[str]) -> np.ndarray:
    """Wide labels (C1..C7, patient_overall) of `uids`, float32 [N, 8]."""
    return labels.set_index("StudyInstanceUID").loc[uids, TARGETS].to_numpy(dtype=np.float32)
