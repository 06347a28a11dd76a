"""Fracture localisation: Grad-CAM of the per-vertebra CNN + BiLSTM, turned into one box per axial slice, and
scored against train_bounding_boxes.csv (share of true boxes hit, mean IoU of the hits); Grad-CAM of the study-level
model over its slices (seed 002's Fig. 3)."""

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


def _backbone_cams(model: nn.Module, x: torch.Tensor, logit: int) -> torch.Tensor:
    """Grad-CAM of one logit of a CNN + BiLSTM (`model.encoder.backbone` a timm-style backbone) on every image its
    backbone sees: x [1, ...] one study's batch -> float [M, h, w] (M images in the order the backbone saw them)."""
    encoder = model.encoder
    original = encoder.backbone
    capture = _CaptureFeatureMap(original)
    encoder.backbone = capture
    try:
        model.eval()
        dev = next(model.parameters()).device
        # cuDNN's LSTM has no backward in eval mode: the native kernels do, with the same results
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
            logits = model(x.to(dev).float())
            model.zero_grad(set_to_none=True)
            logits[0, logit].backward()
        fmap, grad = capture.fmap.detach(), capture.fmap.grad.detach()  # [M, F, h, w]
    finally:
        encoder.backbone = original
    return torch.relu((grad.mean(dim=(2, 3), keepdim=True) * fmap).sum(dim=1))


def _normalised(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """float [N, h, w] -> float32 [N, H, W] in 0..1, one scale for all (0 where the gradient says nothing)."""
    cam = nn.functional.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).cpu().numpy().astype(np.float32)


def vertebra_gradcam(model: nn.Module, x: torch.Tensor, vertebra: int) -> np.ndarray:
    """Grad-CAM of one vertebra's logit over that vertebra's slices.

    Args:
        model: a VertebraCnnLstm (model.encoder.backbone is a timm-style backbone).
        x: float [7, N, C, H, W], one study's input.
        vertebra: 1..7.

    Returns:
        float32 [N, H, W] in 0..1 (0 where the gradient says nothing), one map per slice of that vertebra.
    """
    cam = _backbone_cams(model, x[None], vertebra - 1)
    n = x.shape[1]
    return _normalised(cam.view(7, n, *cam.shape[1:])[vertebra - 1], x.shape[-2:])


def study_gradcam(model: nn.Module, x: torch.Tensor, target: int = 7) -> np.ndarray:
    """Grad-CAM of the study-level model (seed 002's Fig. 3): one logit (index into C1..C7, patient_overall; 7:
    patient_overall) over every sampled slice. x float [N, C, H, W] -> float32 [N, H, W] in 0..1, one scale for the
    study, so the slices the model looks at stand out."""
    return _normalised(_backbone_cams(model, x[None], target), x.shape[-2:])


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


def study_gradcam_figure(model: nn.Module, x: np.ndarray, meta: dict, uid: str, true_boxes: pd.DataFrame,
                         n_show: int = 4, channel: int = 1):
    """The `n_show` sampled slices of a study where the study model's patient_overall Grad-CAM peaks highest, the
    heatmap over the Otsu-cropped slice it saw, with the true boxes of that slice in green (the slices are the input
    x uint8 [N, C, S, S]; `meta["crop_box"]`: the crop on the cache grid)."""
    import matplotlib.pyplot as plt

    cams = study_gradcam(model, torch.from_numpy(x).float() / 255.0)
    numbers = np.asarray(meta["slice_numbers"])[meta["used"]]
    order = sorted(np.argsort([-c.max() for c in cams])[:n_show])
    # inputs stored before the crop was kept in their meta show no boxes
    boxes = true_boxes[true_boxes.StudyInstanceUID == uid] if "crop_box" in meta else true_boxes.iloc[:0]
    y0, y1, x0, x1 = meta.get("crop_box", (0, 1, 0, 1))
    (ch, cw), (oh, ow), side = meta["cache_size"], meta["original_size"], x.shape[-1]
    sy, sx = side / (y1 - y0), side / (x1 - x0)  # cache pixels -> the crop's side
    fig, axes = plt.subplots(1, len(order), figsize=(3.2 * len(order), 3.4), squeeze=False)
    for ax, i in zip(axes[0], order, strict=True):
        ax.imshow(x[i, channel], cmap="gray")
        ax.imshow(cams[i], cmap="jet", alpha=0.35, vmin=0, vmax=1)
        for r in boxes[boxes.slice_number == numbers[i]].itertuples():  # original pixels -> cache pixels -> the crop
            left, top = (r.x * cw / ow - x0) * sx, (r.y * ch / oh - y0) * sy
            ax.add_patch(plt.Rectangle((left, top), r.width * cw / ow * sx, r.height * ch / oh * sy, fill=False,
                                       color="lime", lw=1.5))
        ax.set_title(f"slice {numbers[i]}, peak {cams[i].max():.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{uid}: where the study model looks (patient_overall Grad-CAM)", fontsize=10)
    fig.tight_layout()
    return fig


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
