"""What notebook 02's models train and are scored on: per-slice and per-study datasets, studies resampled to a cube
and back, the 3D losses, RandomForest features, Dice per vertebra."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kernel_utils.stages.fracture_data import crop_box_on_cache
from kernel_utils.stages.vertebra_targets import CERVICAL

VERTEBRAE = [f"C{k}" for k in CERVICAL]


class SliceDataset(Dataset):
    """Every slice of some studies: image float [C, S, S] in 0..1, target float [7] (C1..C7 present)."""

    def __init__(self, studies: list[dict], augment: bool = False):
        self.studies = studies
        self.index = [(i, z) for i, s in enumerate(studies) for z in range(len(s["images"]))]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        s, z = self.index[i]
        img = self.studies[s]["images"][z]
        if self.augment and np.random.rand() < 0.5:
            img = img[:, ::-1]
        item = {"image": torch.from_numpy(np.ascontiguousarray(img).transpose(2, 0, 1)).float() / 255.0}
        if "presence" in self.studies[s]:
            item["target"] = torch.from_numpy(self.studies[s]["presence"][z].astype(np.float32))
        return item


class FeatureSequences(Dataset):
    """One item a study: image float [Z, F] per-slice features, and when given its target (the slices' presence
    [Z, 7] for the localisation BiGRU, the study's labels [8] for the study form's BiLSTM)."""

    def __init__(self, features: list[np.ndarray], presence: list[np.ndarray] | None = None):
        self.features, self.presence = features, presence

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        item = {"image": torch.from_numpy(self.features[i])}
        if self.presence is not None:
            item["target"] = torch.from_numpy(self.presence[i].astype(np.float32))
        return item


Box = tuple[int, int, int, int]  # (y0, y1, x0, x1) on the cache grid, end exclusive


def bone_roi(entry: dict, margin: float, cropped: bool = False) -> Box:
    """The square in-plane region the 3D UNet sees: the study's Otsu bone box (seed 002's crop, `entry["crop_box"]`)
    grown by `margin` of its side on each side, inside the image. On a cache already cropped to that box (`cropped`),
    the whole grid."""
    h, w = entry["images"].shape[1:3]
    if cropped:
        return 0, h, 0, w
    y0, y1, x0, x1 = crop_box_on_cache(entry)
    side = min(max(y1 - y0, x1 - x0) * (1 + 2 * margin), h, w)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    side = int(round(side))
    return top, top + side, left, left + side


def _inside(volume: np.ndarray, roi: Box | None) -> np.ndarray:
    return volume if roi is None else volume[:, roi[0]:roi[1], roi[2]:roi[3]]


def to_cube(images: np.ndarray, size: int, roi: Box | None = None) -> torch.Tensor:
    """uint8 [Z, H, W, C] (its in-plane `roi` when given) -> float [C, size, size, size] in 0..1 (trilinear)."""
    x = torch.from_numpy(np.ascontiguousarray(_inside(images, roi))).permute(3, 0, 1, 2)[None].float() / 255.0
    return F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)[0]


def mask_to_cube(mask: np.ndarray, size: int, roi: Box | None = None) -> torch.Tensor:
    """uint8 [Z, H, W] labels (its in-plane `roi` when given) -> long [size, size, size] with C1..C7 kept and
    everything else 0.

    Nearest-exact: each cube voxel takes the label at its centre, the same pixel-centre alignment as `to_cube`'s
    trilinear images (PyTorch's plain "nearest" samples the first source voxel instead, which shifts the target
    by up to one voxel against the image: 0.69 Dice at 64^3 for a perfect prediction).
    """
    part = _inside(mask, roi)
    m = torch.from_numpy(np.where(part <= 7, part, 0).astype(np.float32))[None, None]
    return F.interpolate(m, size=(size,) * 3, mode="nearest-exact")[0, 0].long()


def probabilities_to_grid(prob: torch.Tensor, shape: tuple[int, int, int], chunk: int = 16,
                          roi: Box | None = None) -> np.ndarray:
    """float [K, D, H', W'] class probabilities -> uint8 [Z, S, S] labels on the study's cache grid (inside its
    in-plane `roi` when the cube was cut from one; background outside).

    Trilinear with pixel centres aligned (as `to_cube`), then the argmax: the boundaries land between cube voxels
    where the probabilities cross, not on the cube's blocks (a perfect 64^3 one-hot comes back at 0.93 mean Dice
    on the bench studies, 0.85 by nearest-exact labels). `chunk` output slices at a time, so a 512 px study never
    holds [K, Z, S, S] floats.
    """
    if roi is not None:
        out = np.zeros(shape, dtype=np.uint8)
        out[:, roi[0]:roi[1], roi[2]:roi[3]] = probabilities_to_grid(
            prob, (shape[0], roi[1] - roi[0], roi[3] - roi[2]), chunk)
        return out
    depth, z = prob.shape[1], shape[0]
    src = ((torch.arange(z, dtype=torch.float64) + 0.5) * depth / z - 0.5).clamp(min=0)  # align_corners=False
    lo = src.floor().long().clamp(max=depth - 1)
    hi = (lo + 1).clamp(max=depth - 1)
    w = (src - lo).clamp(max=1).float()[:, None, None]
    out = np.empty(shape, dtype=np.uint8)
    for a in range(0, z, chunk):
        b = min(a + chunk, z)
        blend = prob[:, lo[a:b]] * (1 - w[a:b]) + prob[:, hi[a:b]] * w[a:b]  # [K, n, H', W']
        planes = F.interpolate(blend.permute(1, 0, 2, 3), size=shape[1:], mode="bilinear", align_corners=False)
        out[a:b] = planes.argmax(dim=1).to(torch.uint8).numpy()
    return out


def best_possible_dice(mask: np.ndarray, size: int, roi: Box | None = None) -> float:
    """Mean Dice over C1..C7 of a perfect prediction at a cube side of `size` (cut from `roi`), brought back to the
    grid as `segment` does: the ceiling that the cube's resolution and region put on the 3D UNet's Dice.
    mask uint8 [Z, S, S]."""
    labels = np.where(mask <= 7, mask, 0)
    one_hot = F.one_hot(mask_to_cube(labels, size, roi), 8).permute(3, 0, 1, 2).float()
    back = probabilities_to_grid(one_hot, labels.shape, roi=roi)
    return float(np.nanmean(list(dice_per_vertebra(back, labels).values())))


def random_affine(x: torch.Tensor, m: torch.Tensor | None, shift: float = 0.1, scale: float = 0.15,
                  degrees: float = 10.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same random in-plane rotation, scale and shift (and a scale along z) of a cube and its mask.

    x float [C, D, H, W], m long [D, H, W] or None. `shift` is a fraction of the side, `scale` the largest relative
    zoom either way; the image resamples trilinearly, the mask by nearest label, both padded with background.
    """
    a = np.deg2rad(np.random.uniform(-degrees, degrees))  # numpy's global stream, seeded per DataLoader worker
    zoom = np.random.uniform(1 - scale, 1 + scale, size=2)  # in-plane, along z
    tx, ty = np.random.uniform(-2 * shift, 2 * shift, size=2)  # the grid spans -1..1
    theta = torch.tensor([[np.cos(a) / zoom[0], -np.sin(a) / zoom[0], 0.0, tx],
                          [np.sin(a) / zoom[0], np.cos(a) / zoom[0], 0.0, ty],
                          [0.0, 0.0, 1 / zoom[1], 0.0]], dtype=torch.float32)[None]  # (x, y, z) = (W, H, D)
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    x = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    if m is not None:
        m = F.grid_sample(m[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[0, 0].long()
    return x, m


class VolumeDataset(Dataset):
    """Studies (their in-plane "roi" where a study has one) resampled to cubes: image float [C, D, D, D], target
    long [1, D, D, D] when a mask is known. `augment`: a left-right flip (it keeps every label's meaning) and, with
    `affine`, `random_affine`."""

    def __init__(self, studies: list[dict], size: int, augment: bool = False, affine: bool = False):
        self.cubes = [to_cube(s["images"], size, s.get("roi")) for s in studies]
        self.masks = [mask_to_cube(s["mask"], size, s.get("roi")) if "mask" in s else None for s in studies]
        self.augment, self.affine = augment, affine

    def __len__(self) -> int:
        return len(self.cubes)

    def __getitem__(self, i: int) -> dict:
        x, m = self.cubes[i], self.masks[i]
        if self.augment and np.random.rand() < 0.5:
            x = x.flip(-1)
            m = m.flip(-1) if m is not None else None
        if self.augment and self.affine:
            x, m = random_affine(x, m)
        item = {"image": x}
        if m is not None:
            item["target"] = m[None]
        return item


def bce_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), batch["target"].float())


def dice_ce_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)(logits.float(), batch["target"])


def rf_features(images: np.ndarray, pixels: int) -> np.ndarray:
    """uint8 [Z, H, W, C] -> float32 [Z, pixels * pixels * C]: area-downsampled slices, seed 000's RF input."""
    return np.stack([cv2.resize(im, (pixels, pixels), interpolation=cv2.INTER_AREA).ravel()
                     for im in images]).astype(np.float32) / 255.0


def dice_per_vertebra(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Dice of C1..C7 (nan where a vertebra is absent from both)."""
    out = {}
    for k in CERVICAL:
        p, t = pred == k, true == k
        denom = p.sum() + t.sum()
        out[f"C{k}"] = float(2 * (p & t).sum() / denom) if denom else float("nan")
    return out
