"""The 3D Vision Transformer of seed 004 (notebook 04): a volume built from the vertebrae, MONAI's ViT with a CLS
token and eight logits (C1..C7, patient_overall), trained with the same services as the CNN + BiLSTM. By default
the ViT encodes each vertebra's block of the volume on its own, after a convolutional stem (`ViTClassifier`).

Input (default): for each of C1..C7, 30 slices evenly spaced through its range from notebook 02, every second one
kept, each cropped to that vertebra's own box (as the per-vertebra CNN sees it) and resized: uint8 [C, 7 * 15, S, S];
or all cropped to the box of the whole cervical spine (`crop="spine"`); or the whole study resampled.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from kernel_utils.io.cache import CacheSpec, iter_cached
from kernel_utils.stages.fracture_data import evenly_spaced, square_box
from kernel_utils.training import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViTSettings:
    """The ViT stage: its training config (sizes in `cfg.params`) and folds."""

    cfg: TrainConfig
    n_folds: int

    name = "vit3d"
    form = "vit"

    @staticmethod
    def for_profile(profile: str, volume: str = "vertebrae") -> ViTSettings:
        # folds, epochs, steps cap, batch, slices per vertebra, size, patch (d, h, w), hidden, layers, heads
        table = {"smoke": (2, 1, 2, 2, 4, 32, (2, 16, 16), 64, 2, 4),
                 "demo": (3, 6, 0, 8, 8, 48, (4, 16, 16), 96, 4, 4),
                 "bench": (5, 30, 0, 16, 30, 64, (5, 16, 16), 384, 8, 8),
                 "full": (5, 30, 0, 4, 30, 128, (5, 16, 16), 768, 12, 12)}
        folds, epochs, steps, batch, per_vertebra, size, patch, hidden, layers, heads = table[profile]
        # rotate_shift False: flips and intensity jitter only, as the CNN; with the warp the CPU pilot stayed at the
        # prior (OOF loss 1.00x), with flips alone 0.72x, mean vertebra AUC 0.59 -> 0.78
        params = (("volume", volume), ("crop", "vertebra"), ("slices_per_vertebra", per_vertebra), ("keep_every", 2),
                  ("size", size), ("stem", (24, 48)),
                  ("encode", "vertebra" if volume == "vertebrae" else "volume"),
                  ("train_on", "vertebrae" if volume == "vertebrae" else "studies"), ("rotate_shift", False),
                  ("patch", patch), ("hidden", hidden), ("layers", layers), ("heads", heads), ("dropout", 0.1))
        cfg = TrainConfig(stage="vit3d", model="monai_vit", epochs=epochs, batch_size=batch, lr=3e-4,
                          patience=5, max_steps_per_epoch=steps, params=params)
        return ViTSettings(cfg, folds)

    @property
    def depth(self) -> int:
        p = dict(self.cfg.params)
        return 7 * len(range(0, p["slices_per_vertebra"], p["keep_every"]))


def _cervical_box(ranges: pd.DataFrame | None, h: int, w: int, margin: float = 0.25) -> tuple[int, int, int, int]:
    if ranges is None or not ranges.found.any():
        return 0, h, 0, w
    found = ranges[ranges.found]
    y0, y1, x0, x1 = found.y0.min(), found.y1.max(), found.x0.min(), found.x1.max()
    side = max(y1 - y0, x1 - x0) * (1 + 2 * margin)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    y0, x0 = int(max(cy - side / 2, 0)), int(max(cx - side / 2, 0))
    return y0, int(min(y0 + side, h)), x0, int(min(x0 + side, w))


def vertebra_volume(images: np.ndarray, ranges: pd.DataFrame | None, slices_per_vertebra: int = 30,
                    keep_every: int = 2, size: int = 64, crop: str = "vertebra",
                    margin: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Seed 004's input from one study.

    Args:
        images: uint8 [Z, S, S, C] cached windows.
        ranges: the study's rows of `vertebrae.csv`; a vertebra not found takes the k-th of seven even windows
            (whole slices).
        crop: "vertebra": each vertebra's slices cropped to its own square box with `margin`, so the fracture keeps
            the resolution the per-vertebra CNN sees; "spine": every slice cropped to the cervical spine's box.

    Returns:
        uint8 [C, 7 * ceil(slices_per_vertebra / keep_every), size, size] and the slice index of every depth.
    """
    if crop not in ("vertebra", "spine"):
        raise ValueError(f"ViT crop must be 'vertebra' or 'spine', not {crop!r}")
    z_n, h, w, c = images.shape
    rows = ranges.set_index("vertebra") if ranges is not None and len(ranges) else None
    spine = _cervical_box(ranges, h, w)
    picks, boxes = [], []
    for k in range(1, 8):
        row = rows.loc[f"C{k}"] if rows is not None and f"C{k}" in rows.index else None
        if row is not None and bool(row["found"]):
            zs = evenly_spaced(int(row["first"]), int(row["last"]), slices_per_vertebra)
            box = (square_box(int(row["y0"]), int(row["y1"]), int(row["x0"]), int(row["x1"]), margin, h, w)
                   if crop == "vertebra" else spine)
        else:
            zs = evenly_spaced((k - 1) * z_n // 7, max(k * z_n // 7 - 1, (k - 1) * z_n // 7), slices_per_vertebra)
            box = (0, h, 0, w) if crop == "vertebra" else spine
        picks.append(zs[::keep_every])
        boxes += [box] * len(picks[-1])
    zs = np.concatenate(picks)
    out = np.empty((c, len(zs), size, size), dtype=np.uint8)
    for i, (z, (y0, y1, x0, x1)) in enumerate(zip(zs, boxes, strict=True)):
        img = cv2.resize(np.ascontiguousarray(images[z, y0:y1, x0:x1]), (size, size), interpolation=cv2.INTER_AREA)
        out[:, i] = img.reshape(size, size, c).transpose(2, 0, 1)
    return out, zs


def study_volume(images: np.ndarray, depth: int, size: int) -> np.ndarray:
    """The whole study resampled: uint8 [C, depth, size, size]."""
    x = torch.from_numpy(images).permute(3, 0, 1, 2)[None].float()
    x = nn.functional.interpolate(x, size=(depth, size, size), mode="trilinear", align_corners=False)[0]
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def build_volumes(data_dir: str | os.PathLike, work_dir: str | os.PathLike, spec: CacheSpec, settings: ViTSettings,
                  split: str) -> tuple[list[str], list[np.ndarray]]:
    """(uids, volumes) of every readable study of a split, from the cache and notebook 02's ranges."""
    p = dict(settings.cfg.params)
    loc_path = Path(work_dir) / "localisation" / "vertebrae.csv"
    loc = pd.read_csv(loc_path) if loc_path.exists() else None
    uids, volumes = [], []
    for _, uid, entry in iter_cached(data_dir, work_dir, spec, (split,)):
        if p["volume"] == "vertebrae":
            rows = loc[loc.StudyInstanceUID == uid] if loc is not None else None
            vol, _ = vertebra_volume(entry["images"], rows, p["slices_per_vertebra"], p["keep_every"], p["size"],
                                     p.get("crop", "spine"))
        else:
            vol = study_volume(entry["images"], settings.depth, p["size"])
        uids.append(uid)
        volumes.append(vol)
    return uids, volumes
