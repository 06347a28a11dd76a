"""The 3D Vision Transformer of seed 004 (notebook 04): a volume built from the vertebrae, MONAI's ViT with a CLS
token and eight logits (C1..C7, patient_overall), trained with the same services as the CNN + BiLSTM.

Input (default): for each of C1..C7, 30 slices evenly spaced through its range from notebook 02, every second one
kept, cropped to the cervical spine's box and resized: uint8 [C, 7 * 15, S, S]. Or the whole study resampled.
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

from kernel_utils.cache import CacheSpec, iter_cached
from kernel_utils.fracture_data import FractureDataset, evenly_spaced
from kernel_utils.models import register
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
        table = {"smoke": (2, 1, 2, 2, 4, 32, (7, 16, 16), 64, 2, 4),
                 "demo": (3, 6, 0, 4, 8, 48, (7, 16, 16), 96, 4, 4),
                 "bench": (5, 30, 0, 8, 30, 64, (5, 16, 16), 384, 8, 8),
                 "full": (5, 30, 0, 4, 30, 128, (5, 16, 16), 768, 12, 12)}
        folds, epochs, steps, batch, per_vertebra, size, patch, hidden, layers, heads = table[profile]
        params = (("volume", volume), ("slices_per_vertebra", per_vertebra), ("keep_every", 2), ("size", size),
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
                    keep_every: int = 2, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Seed 004's input from one study.

    Args:
        images: uint8 [Z, S, S, C] cached windows.
        ranges: the study's rows of `vertebrae.csv`; a vertebra not found takes the k-th of seven even windows.

    Returns:
        uint8 [C, 7 * ceil(slices_per_vertebra / keep_every), size, size] and the slice index of every depth.
    """
    z_n, h, w, c = images.shape
    rows = ranges.set_index("vertebra") if ranges is not None and len(ranges) else None
    picks = []
    for k in range(1, 8):
        row = rows.loc[f"C{k}"] if rows is not None and f"C{k}" in rows.index else None
        if row is not None and bool(row["found"]):
            zs = evenly_spaced(int(row["first"]), int(row["last"]), slices_per_vertebra)
        else:
            zs = evenly_spaced((k - 1) * z_n // 7, max(k * z_n // 7 - 1, (k - 1) * z_n // 7), slices_per_vertebra)
        picks.append(zs[::keep_every])
    zs = np.concatenate(picks)
    y0, y1, x0, x1 = _cervical_box(ranges, h, w)
    out = np.empty((c, len(zs), size, size), dtype=np.uint8)
    for i, z in enumerate(zs):
        img = cv2.resize(np.ascontiguousarray(images[z, y0:y1, x0:x1]), (size, size), interpolation=cv2.INTER_AREA)
        out[:, i] = img.reshape(size, size, c).transpose(2, 0, 1)
    return out, zs


def study_volume(images: np.ndarray, depth: int, size: int) -> np.ndarray:
    """The whole study resampled: uint8 [C, depth, size, size]."""
    x = torch.from_numpy(images).permute(3, 0, 1, 2)[None].float()
    x = nn.functional.interpolate(x, size=(depth, size, size), mode="trilinear", align_corners=False)[0]
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


class ViTClassifier(nn.Module):
    """MONAI's ViT with a CLS token and a linear head of eight logits.

    forward: x [B, C, D, H, W] -> logits [B, 8].
    """

    def __init__(self, in_channels: int, img_size: tuple[int, int, int], patch: tuple[int, int, int], hidden: int,
                 layers: int, heads: int, dropout: float):
        super().__init__()
        from monai.networks.nets import ViT

        self.vit = ViT(in_channels=in_channels, img_size=img_size, patch_size=patch, hidden_size=hidden,
                       mlp_dim=4 * hidden, num_layers=layers, num_heads=heads, proj_type="conv",
                       classification=True, num_classes=8, dropout_rate=dropout, post_activation=None,
                       spatial_dims=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)[0]


@register("vit3d")
def _vit(cfg: TrainConfig, in_channels: int) -> nn.Module:
    p = dict(cfg.params)
    depth = 7 * len(range(0, p["slices_per_vertebra"], p["keep_every"]))
    return ViTClassifier(in_channels, (depth, p["size"], p["size"]), tuple(p["patch"]), p["hidden"], p["layers"],
                         p["heads"], p["dropout"])


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
            vol, _ = vertebra_volume(entry["images"], rows, p["slices_per_vertebra"], p["keep_every"], p["size"])
        else:
            vol = study_volume(entry["images"], settings.depth, p["size"])
        uids.append(uid)
        volumes.append(vol)
    return uids, volumes


def volume_dataset(volumes: list[np.ndarray], targets: np.ndarray | None, augment: bool = False) -> FractureDataset:
    """Volumes uint8 [C, D, H, W] as a dataset (flips, small rotations and shifts in-plane, intensity jitter)."""
    return FractureDataset(volumes, targets, augment=augment, image_channels=None)


@torch.no_grad()
def occlusion_map(model: nn.Module, volume: np.ndarray, target: int = 7, block: tuple[int, int, int] = (7, 8, 8),
                  batch: int = 16) -> np.ndarray:
    """How much the target's logit drops when each block of the volume is blanked: float [D/b, H/b, W/b]."""
    model.eval()
    dev = next(model.parameters()).device
    x = torch.from_numpy(volume).float()[None].to(dev) / 255.0
    base = float(model(x)[0, target])
    _, d, h, w = volume.shape
    bd, bh, bw = block
    grid = [(i, j, k) for i in range(0, d, bd) for j in range(0, h, bh) for k in range(0, w, bw)]
    drops = np.zeros((len(range(0, d, bd)), len(range(0, h, bh)), len(range(0, w, bw))), dtype=np.float32)
    for start in range(0, len(grid), batch):
        cells = grid[start: start + batch]
        xs = x.repeat(len(cells), 1, 1, 1, 1)
        for n, (i, j, k) in enumerate(cells):
            xs[n, :, i: i + bd, j: j + bh, k: k + bw] = 0
        out = model(xs)[:, target].float().cpu().numpy()
        for n, (i, j, k) in enumerate(cells):
            drops[i // bd, j // bh, k // bw] = base - out[n]
    return drops
