"""The 3D Vision Transformer of seed 004 (notebook 04): a volume built from the vertebrae, MONAI's ViT with a CLS
token and eight logits (C1..C7, patient_overall), trained with the same services as the CNN + BiLSTM. By default
the ViT encodes each vertebra's block of the volume on its own, after a convolutional stem (`ViTClassifier`).

Input (default): for each of C1..C7, 30 slices evenly spaced through its range from notebook 02, every second one
kept, each cropped to that vertebra's own box (as the per-vertebra CNN sees it) and resized: uint8 [C, 7 * 15, S, S];
or all cropped to the box of the whole cervical spine (`crop="spine"`); or the whole study resampled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from kernel_utils.settings import StageSettings
from kernel_utils.stages.fracture_data import entry_meta, evenly_spaced, square_box
from kernel_utils.stages.study_localisation import StudyLocalisation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViTSettings(StageSettings):
    """Seed 004's 3D ViT, following the stage contract of `stages/stage.py`.

    Attributes:
        volume: "vertebrae" (`vertebra_volume`, from notebook 02's ranges) or "study" (the whole study resampled).
        crop: "vertebra" (each vertebra's own box) or "spine" (the cervical spine's box).
        slices_per_vertebra, keep_every, size: depth and side of the volume.
        stem: channels of the stride-2 convolutions before the patches (empty: raw patches as seed 004).
        encode: "vertebra" (each vertebra's block on its own, a patient head over the seven CLS tokens) or "volume".
        train_on: "vertebrae" (single vertebrae, then the patient head) or "studies".
        rotate_shift: the small rotation and shift augmentation (False: flips and intensity jitter only).
        patch, hidden, layers, heads, dropout: MONAI's ViT.
        mask_channel: with volume "vertebrae", notebook 02's mask of each depth's vertebra as one more channel.
    """

    form: ClassVar[str] = "vit"
    family: ClassVar[str] = "vit"
    stage: ClassVar[str] = "vit3d"
    PROFILES: ClassVar[dict[str, dict]] = {
        "smoke": dict(n_folds=2, epochs=1, max_steps_per_epoch=2, batch_size=2, slices_per_vertebra=4, size=32,
                      patch=(2, 16, 16), hidden=64, layers=2, heads=4, mask_channel=True),
        "demo": dict(n_folds=2, epochs=30, batch_size=8, slices_per_vertebra=8, size=48, patch=(4, 16, 16),
                     hidden=96, layers=4, heads=4, mask_channel=True),
        "bench": dict(batch_size=16, size=64, hidden=384, layers=8, heads=8),
        "full": dict(),
    }

    n_folds: int = 5
    model: str = "monai_vit"
    epochs: int = 30
    max_steps_per_epoch: int = 0
    batch_size: int = 4
    lr: float = 3e-4
    patience: int = 5
    volume: str = "vertebrae"
    crop: str = "vertebra"
    slices_per_vertebra: int = 30
    keep_every: int = 2
    size: int = 128
    stem: tuple[int, ...] = (24, 48)
    encode: str = "vertebra"
    train_on: str = "vertebrae"
    rotate_shift: bool = False
    patch: tuple[int, int, int] = (5, 16, 16)
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    dropout: float = 0.1
    mask_channel: bool = False

    name: ClassVar[str] = "vit3d"
    slices_first: ClassVar[bool] = False
    wants_extra_slices: ClassVar[bool] = False
    labels_from_localisation: ClassVar[bool] = False
    slice_loss: ClassVar[float] = 0.0

    @classmethod
    def for_profile(cls, profile: str, volume: str = "vertebrae", **overrides) -> ViTSettings:
        """`volume="study"` encodes and trains on the whole resampled study, as seed 004 does."""
        whole = {"encode": "volume", "train_on": "studies"} if volume == "study" else {}
        return super().for_profile(profile, volume=volume, **whole, **overrides)

    @property
    def depth(self) -> int:
        return 7 * len(range(0, self.slices_per_vertebra, self.keep_every))

    @property
    def uses_localisation(self) -> bool:
        return self.volume == "vertebrae"

    def input_fields(self) -> dict:
        fields = {k: getattr(self, k) for k in ("volume", "crop", "slices_per_vertebra", "keep_every", "size")}
        return {**fields, "mask_channel": True} if self.mask_channel else fields

    def study_input(self, entry: dict, loc: StudyLocalisation) -> tuple[np.ndarray, dict]:
        """uint8 [C, depth, size, size] and its meta (the slice of every depth, `used` [depth])."""
        meta = entry_meta(entry)
        if self.volume == "vertebrae":
            x, meta["used"] = vertebra_volume(entry["images"], loc.rows, self.slices_per_vertebra, self.keep_every,
                                              self.size, self.crop,
                                              mask=self._mask(entry, loc))
        else:
            x = study_volume(entry["images"], self.depth, self.size)
            meta["used"] = np.rint(np.linspace(0, len(entry["images"]) - 1, self.depth)).astype(int)
        return x, meta

    def _mask(self, entry: dict, loc: StudyLocalisation) -> np.ndarray | None:
        """The study's vertebra mask when the ViT takes it as a channel (all background where notebook 02 wrote
        none)."""
        if not self.mask_channel:
            return None
        mask = loc.load_mask()
        return mask if mask is not None else np.zeros(entry["images"].shape[:3], np.uint8)

    @staticmethod
    def in_channels(x: np.ndarray) -> int:
        return int(x.shape[0])

    @staticmethod
    def image_channels(channels: int) -> None:
        return None

    @property
    def trains_on_vertebrae(self) -> bool:
        return self.train_on == "vertebrae"

    @property
    def patient_modes(self) -> tuple[str, ...]:
        return ("head", "product") if self.trains_on_vertebrae else ("head",)

    @staticmethod
    def vertebra_block(x: np.ndarray, k: int) -> np.ndarray:
        """Vertebra k's block [C, depth / 7, H, W] of a volume [C, depth, H, W]."""
        d = x.shape[1] // 7
        return x[:, k * d:(k + 1) * d]


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
                    margin: float = 0.15, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seed 004's input from one study.

    Args:
        images: uint8 [Z, S, S, C] cached windows.
        ranges: the study's rows of `vertebrae.csv`; a vertebra not found takes the k-th of seven even windows
            (whole slices).
        crop: "vertebra": each vertebra's slices cropped to its own square box with `margin`, so the fracture keeps
            the resolution the per-vertebra CNN sees; "spine": every slice cropped to the cervical spine's box.
        mask: uint8 [Z, S, S] vertebra labels; when given, each depth gets one more channel, 255 where its
            vertebra is (as the per-vertebra CNN's last channel).

    Returns:
        uint8 [C (+1 with mask), 7 * ceil(slices_per_vertebra / keep_every), size, size] and the slice index of
        every depth.
    """
    if crop not in ("vertebra", "spine"):
        raise ValueError(f"ViT crop must be 'vertebra' or 'spine', not {crop!r}")
    z_n, h, w, c = images.shape
    rows = ranges.set_index("vertebra") if ranges is not None and len(ranges) else None
    spine = _cervical_box(ranges, h, w)
    picks, boxes, labels = [], [], []
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
        labels += [k] * len(picks[-1])
    zs = np.concatenate(picks)
    out = np.empty((c + (mask is not None), len(zs), size, size), dtype=np.uint8)
    for i, (z, (y0, y1, x0, x1), k) in enumerate(zip(zs, boxes, labels, strict=True)):
        img = cv2.resize(np.ascontiguousarray(images[z, y0:y1, x0:x1]), (size, size), interpolation=cv2.INTER_AREA)
        out[:c, i] = img.reshape(size, size, c).transpose(2, 0, 1)
        if mask is not None:
            own = ((mask[z, y0:y1, x0:x1] == k) * 255).astype(np.uint8)
            out[c, i] = cv2.resize(own, (size, size), interpolation=cv2.INTER_NEAREST)
    return out, zs


def study_volume(images: np.ndarray, depth: int, size: int) -> np.ndarray:
    """The whole study resampled: uint8 [C, depth, size, size]."""
    x = torch.from_numpy(images).permute(3, 0, 1, 2)[None].float()
    x = nn.functional.interpolate(x, size=(depth, size, size), mode="trilinear", align_corners=False)[0]
    return x.round().clamp(0, 255).to(torch.uint8).numpy()
