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

from kernel_utils.cache import CacheSpec, iter_cached
from kernel_utils.fracture_data import evenly_spaced, square_box
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


def conv_stem(in_channels: int, channels: tuple[int, ...]) -> nn.Module:
    """Convolutions that halve the in-plane size each (the first in-plane only, the others 3x3x3), BatchNorm, ReLU:
    [B, C, D, H, W] -> [B, channels[-1], D, H / 2^n, W / 2^n]. Empty: identity."""
    layers, c = [], in_channels
    for i, out in enumerate(channels):
        kernel, pad = ((1, 3, 3), (0, 1, 1)) if i == 0 else ((3, 3, 3), (1, 1, 1))
        layers += [nn.Conv3d(c, out, kernel, stride=(1, 2, 2), padding=pad, bias=False), nn.BatchNorm3d(out),
                   nn.ReLU(inplace=True)]
        c = out
    return nn.Sequential(*layers)


class ViTClassifier(nn.Module):
    """MONAI's ViT with a CLS token, after an optional convolutional stem, in one of two encodings.

    `encode="volume"` (seed 004): one ViT over the whole volume, a linear head of eight logits from its CLS token.
    `encode="vertebra"`: the volume is the seven vertebrae's blocks of D / 7 slices, and the same ViT encodes each
    block on its own: a linear head gives each vertebra its logit from that block's CLS token, and a small head
    over the seven CLS tokens (mean and max) gives patient_overall. Each label then belongs to its own tokens
    (48 instead of 336 at bench size), the way the per-vertebra CNN sees it. With `train_on="vertebrae"` (the
    default) it trains like the per-vertebra CNN: on single blocks x [B, C, D / 7, H, W] -> [B, 1], then the
    patient head on the frozen features.

    Seed 004 embeds raw patches of the whole volume; on the bench set that ViT stayed at chance (mean vertebra AUC
    0.48-0.50 out of fold) while a small 3D CNN reached 0.98 on the same vertebra crops: a thin fracture line is a
    poor fit for one linear map of a 16x16 patch. Two stride-2 convolutions first (Xiao et al. 2021, "Early
    convolutions help transformers see better") took one vertebra's AUC from 0.69 to 0.84 in 400 steps. `patch` is
    in input voxels either way, so the token grid is the same; `stem=()` is seed 004's plain patch embedding.

    forward: x [B, C, D, H, W] -> logits [B, 8].
    """

    def __init__(self, in_channels: int, img_size: tuple[int, int, int], patch: tuple[int, int, int], hidden: int,
                 layers: int, heads: int, dropout: float, stem: tuple[int, ...] = (), encode: str = "volume"):
        super().__init__()
        from monai.networks.nets import ViT

        if encode not in ("volume", "vertebra"):
            raise ValueError(f"ViT encode must be 'volume' or 'vertebra', not {encode!r}")
        depth = img_size[0] // 7 if encode == "vertebra" else img_size[0]
        if encode == "vertebra" and img_size[0] % 7:
            raise ValueError(f"ViT depth {img_size[0]} must be seven vertebra blocks to encode each vertebra")
        scale = 2 ** len(stem)
        if img_size[1] % scale or img_size[2] % scale or patch[1] % scale or patch[2] % scale:
            raise ValueError(f"ViT size {img_size[1:]} and patch {patch[1:]} must be multiples of {scale} "
                             f"for a stem of {len(stem)} stride-2 convolutions")
        self.encode, self.block_depth = encode, depth if encode == "vertebra" else None
        self.stem = conv_stem(in_channels, tuple(stem))
        self.vit = ViT(in_channels=stem[-1] if stem else in_channels,
                       img_size=(depth, img_size[1] // scale, img_size[2] // scale),
                       patch_size=(patch[0], patch[1] // scale, patch[2] // scale), hidden_size=hidden,
                       mlp_dim=4 * hidden, num_layers=layers, num_heads=heads, proj_type="conv",
                       classification=True, num_classes=1 if encode == "vertebra" else 8, dropout_rate=dropout,
                       post_activation=None, spatial_dims=3)
        if encode == "vertebra":
            self.patient_head = nn.Sequential(nn.Linear(2 * hidden, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encode == "volume" or x.shape[2] == self.block_depth:
            return self.vit(self.stem(x))[0]  # the volume's 8 logits, or one vertebra's block: its logit [B, 1]
        feats = self.vertebra_features(x)
        return torch.cat([self.vit.classification_head(feats).squeeze(-1), self.patient_logit(feats)], dim=1)

    def vertebra_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, 7 * d, H, W] -> each vertebra block's normed CLS token [B, 7, hidden]."""
        b, c, d, h, w = x.shape
        blocks = x.view(b, c, 7, d // 7, h, w).transpose(1, 2).flatten(0, 1)  # [B * 7, C, d, H, W]
        _, hidden_states = self.vit(self.stem(blocks))
        return self.vit.norm(hidden_states[-1][:, 0]).view(b, 7, -1)

    def patient_logit(self, feats: torch.Tensor) -> torch.Tensor:
        """Vertebra features [B, 7, hidden] -> patient_overall logit [B, 1]."""
        return self.patient_head(torch.cat([feats.mean(dim=1), feats.amax(dim=1)], dim=1))


@register("vit3d")
def _vit(cfg: TrainConfig, in_channels: int) -> nn.Module:
    p = dict(cfg.params)
    depth = 7 * len(range(0, p["slices_per_vertebra"], p["keep_every"]))
    if p.get("encode") == "vertebra" and p["volume"] != "vertebrae":
        raise ValueError("encode='vertebra' needs the vertebra volume (volume='vertebrae'), not the whole study")
    return ViTClassifier(in_channels, (depth, p["size"], p["size"]), tuple(p["patch"]), p["hidden"], p["layers"],
                         p["heads"], p["dropout"], tuple(p.get("stem", ())),
                         p.get("encode", "volume"))


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
