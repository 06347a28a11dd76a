"""Fracture localisation: Grad-CAM of the per-vertebra CNN + BiLSTM, turned into one box per axial slice, and
scored against train_bounding_boxes.csv (share of true boxes hit, mean IoU of the hits)."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn


class _CaptureFeatureMap(nn.Module):
    """Wraps a timm backbone (forward_features + forward_head) and keeps its last feature map with its grad."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.pooled_features = inner.pooled_features
        self.fmap: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.inner.forward_features(x)
        if fmap.requires_grad:
            fmap.retain_grad()
        else:  # a backbone without trainable layers before the map: make the map itself the leaf
            fmap.requires_grad_(True)
        self.fmap = fmap
        return self.inner.forward_head(fmap, pre_logits=True)


def vertebra_gradcam(model: nn.Module, x: torch.Tensor, vertebra: int) -> np.ndarray:
    """Grad-CAM of one vertebra's logit over that vertebra's slices.

    Args:
        model: a VertebraCnnLstm (model.encoder.backbone is a timm-style backbone).
        x: float [7, N, C, H, W], one study's input.
        vertebra: 1..7.

    Returns:
        float32 [N, H, W] in 0..1 (0 where the gradient says nothing), one map per slice of that vertebra.
    """
    encoder = model.encoder
    original = encoder.backbone
    capture = _CaptureFeatureMap(original)
    encoder.backbone = capture
    try:
        model.eval()
        dev = next(model.parameters()).device
        # cuDNN's LSTM has no backward in eval mode: the native kernels do, with the same results
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
            logits = model(x[None].to(dev).float())
            model.zero_grad(set_to_none=True)
            logits[0, vertebra - 1].backward()
        fmap, grad = capture.fmap.detach(), capture.fmap.grad.detach()  # [7 * N, F, h, w]
    finally:
        encoder.backbone = original
    n = x.shape[1]
    fmap = fmap.view(7, n, *fmap.shape[1:])[vertebra - 1]
    grad = grad.view(7, n, *grad.shape[1:])[vertebra - 1]
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * fmap).sum(dim=1))  # [N, h, w]
    cam = nn.functional.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).cpu().numpy().astype(np.float32)


def cam_box(cam: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the largest region where cam >= threshold * its maximum, or None."""
    if cam.max() <= 0:
        return None
    binary = (cam >= threshold * cam.max()).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(binary)
    if n <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = stats[best, :4]
    return int(y), int(y + h), int(x), int(x + w)


def crop_to_original(box: tuple[int, int, int, int], crop_box: tuple[int, int, int, int], crop: int,
                     cache_size: tuple[int, int], original_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box in crop pixels -> (x, y, width, height) in DICOM pixels (the competition's box format)."""
    y0, y1, x0, x1 = box
    cy0, cy1, cx0, cx1 = crop_box
    sy, sx = (cy1 - cy0) / crop, (cx1 - cx0) / crop
    fy, fx = original_size[0] / cache_size[0], original_size[1] / cache_size[1]
    oy0, oy1 = (cy0 + y0 * sy) * fy, (cy0 + y1 * sy) * fy
    ox0, ox1 = (cx0 + x0 * sx) * fx, (cx0 + x1 * sx) * fx
    return ox0, oy0, ox1 - ox0, oy1 - oy0


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """IoU of two (x, y, width, height) boxes."""
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0.0, min(ax1, bx1) - max(a[0], b[0])), max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def score_boxes(predicted: pd.DataFrame, truth: pd.DataFrame, hit_iou: float = 0.1) -> dict[str, float]:
    """Share of true boxes hit (a predicted box on the same study and slice with IoU >= hit_iou), and the mean
    IoU of the hits. Both tables: StudyInstanceUID, slice_number, x, y, width, height."""
    pred = {(r.StudyInstanceUID, int(r.slice_number)): (r.x, r.y, r.width, r.height)
            for r in predicted.itertuples()}
    ious = []
    for r in truth.itertuples():
        p = pred.get((r.StudyInstanceUID, int(r.slice_number)))
        ious.append(iou(p, (r.x, r.y, r.width, r.height)) if p is not None else 0.0)
    ious = np.array(ious)
    hits = ious >= hit_iou
    return {"true_boxes": len(truth), "hit_share": float(hits.mean()) if len(ious) else float("nan"),
            "mean_iou_of_hits": float(ious[hits].mean()) if hits.any() else float("nan")}


def study_boxes(model: nn.Module, x: np.ndarray, meta: dict, uid: str, vertebrae: list[int],
                threshold: float = 0.5) -> pd.DataFrame:
    """One box per axial slice of each given vertebra's range, from the Grad-CAM of the nearest sampled slice.

    Args:
        model: a per-vertebra CNN + BiLSTM.
        x: uint8 [7, N, C, crop, crop], the study's input; meta: its `build_inputs` meta.
        vertebrae: which vertebrae (1..7) to localise, e.g. those predicted fractured.

    Returns:
        StudyInstanceUID, vertebra, slice_number, x, y, width, height (DICOM pixels), cam_peak.
    """
    crop = x.shape[-1]
    t = torch.from_numpy(x).float() / 255.0
    rows = []
    for k in vertebrae:
        cams = vertebra_gradcam(model, t, k)
        used = meta["used"][k - 1]
        boxes = [cam_box(c, threshold) for c in cams]
        for z in range(int(used.min()), int(used.max()) + 1):
            i = int(np.argmin(np.abs(used - z)))
            if boxes[i] is None:
                continue
            bx, by, bw, bh = crop_to_original(boxes[i], tuple(meta["crop_boxes"][k - 1]), crop,
                                              meta["cache_size"], meta["original_size"])
            rows.append({"StudyInstanceUID": uid, "vertebra": f"C{k}", "slice_number": int(meta["slice_numbers"][z]),
                         "x": bx, "y": by, "width": bw, "height": bh, "cam_peak": float(cams[i].max())})
    return pd.DataFrame(rows, columns=["StudyInstanceUID", "vertebra", "slice_number", "x", "y", "width", "height",
                                       "cam_peak"])


def gradcam_figure(model: nn.Module, x: np.ndarray, meta: dict, images: np.ndarray, uid: str, vertebra: int,
                   true_boxes: pd.DataFrame, channel: int = 1):
    """Figure of the sampled slice of `vertebra` with the strongest Grad-CAM (one with a true box when there is
    one): heatmap over the vertebra's crop, the predicted box in red, the true boxes in green."""
    from kernel_utils.explain.figures import plot_fracture_boxes

    cams = vertebra_gradcam(model, torch.from_numpy(x).float() / 255.0, vertebra)
    used = meta["used"][vertebra - 1]
    numbers = meta["slice_numbers"][used]
    truth = true_boxes[true_boxes.StudyInstanceUID == uid]
    boxed = [i for i, n in enumerate(numbers) if n in set(truth.slice_number)]
    i = max(boxed or range(len(used)), key=lambda j: cams[j].max())
    crop = x.shape[-1]
    crop_box = tuple(meta["crop_boxes"][vertebra - 1])
    box = cam_box(cams[i])
    predicted = [crop_to_original(box, crop_box, crop, meta["cache_size"], meta["original_size"])] if box else []
    cx, cy, cw, ch = crop_to_original((0, crop, 0, crop), crop_box, crop, meta["cache_size"], meta["original_size"])
    true = [(r.x, r.y, r.width, r.height) for r in truth[truth.slice_number == numbers[i]].itertuples()]
    return plot_fracture_boxes(images[used[i], ..., channel], meta["original_size"], predicted, true, cams[i],
                               (cx, cy, cx + cw, cy + ch), title=f"{uid} C{vertebra}, slice {numbers[i]}")


def boxes_for_studies(model_of, uids: list[str], inputs: list[np.ndarray], metas: list[dict], vertebrae_of,
                      only: set[str] | None = None) -> pd.DataFrame:
    """`study_boxes` over many studies.

    Args:
        model_of: uid -> the model to explain (e.g. its out-of-fold model).
        vertebrae_of: uid -> the vertebrae to localise (the labelled or the predicted fractures).
        only: restrict to these uids.
    """
    parts = [study_boxes(model_of(u), x, m, u, vertebrae_of(u))
             for u, x, m in zip(uids, inputs, metas, strict=True) if only is None or u in only]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=["StudyInstanceUID", "vertebra", "slice_number", "x", "y", "width", "height",
                                     "cam_peak"])
    return pd.concat(parts, ignore_index=True)
