"""Figures a competitor would rather look at than read: windows, sagittal reformats, masks, boxes."""

from __future__ import annotations

import contextlib
import logging

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from kernel_utils.io.windowing import SEED002_WINDOWS, Window, window

log = logging.getLogger(__name__)
LABEL_CMAP = plt.get_cmap("tab20", 20)


@contextlib.contextmanager
def skipped_on_error(what: str):
    """Run the code of a figure; an error is logged and the figure skipped, so a figure never ends a run."""
    try:
        yield
    except Exception as e:
        log.warning("%s skipped: %s: %s", what, type(e).__name__, e)


def _overlay(ax, mask: np.ndarray, aspect: float = 1.0) -> None:
    shown = np.ma.masked_equal(mask.astype(int), 0)
    ax.imshow(shown, cmap=LABEL_CMAP, vmin=0, vmax=19, alpha=0.45, aspect=aspect, interpolation="nearest")


def plot_windows(images: np.ndarray, slice_indices: list[int], window_names: list[str] | None = None,
                 title: str = ""):
    """Grid of cached slices: a row per slice index, a column per window channel. images uint8 [Z, H, W, C]."""
    c = images.shape[-1]
    names = window_names or [f"channel {i}" for i in range(c)]
    fig, axes = plt.subplots(len(slice_indices), c, figsize=(3 * c, 3 * len(slice_indices)), squeeze=False)
    for r, k in enumerate(slice_indices):
        for ch in range(c):
            ax = axes[r, ch]
            ax.imshow(images[k, ..., ch], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"slice {k}: {names[ch]}", fontsize=9)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_sagittal(volume: np.ndarray, spacing: tuple[float, float, float], mask: np.ndarray | None = None,
                  column: int | None = None, title: str = "", win: Window = SEED002_WINDOWS[1]):
    """Sagittal reformat (head up, anterior left) of HU int16 or one uint8 channel [Z, H, W], mask over it.

    The column defaults to the centre of the cervical labels in `mask`, else the middle of the image.
    """
    if column is None:
        cols = np.nonzero((mask >= 1) & (mask <= 7))[2] if mask is not None else []
        column = int(np.median(cols)) if len(cols) else volume.shape[2] // 2
    plane = volume[:, :, column]
    img = window(plane, win.level, win.width) if volume.dtype != np.uint8 else plane
    aspect = spacing[0] / spacing[1]
    panels = 2 if mask is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 5), squeeze=False)
    for i in range(panels):
        axes[0, i].imshow(img, cmap="gray", aspect=aspect)
        axes[0, i].axis("off")
    axes[0, 0].set_title(f"sagittal, column {column}", fontsize=9)
    if mask is not None:
        _overlay(axes[0, 1], mask[:, :, column], aspect)
        axes[0, 1].set_title("segmentation over it", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_study_preview(hu: np.ndarray, spacing: tuple[float, float, float], labels: np.ndarray | None = None,
                       boxes: dict[int, list[tuple[float, float, float, float]]] | None = None, title: str = ""):
    """Axial slices in the bone and soft-tissue windows with fracture boxes, and a sagittal reformat with labels.

    Args:
        hu: int16 [Z, H, W] head first.
        spacing: (dz, dy, dx) mm.
        labels: optional uint8 [Z, H, W] vertebra labels.
        boxes: optional {slice index: [(x, y, width, height), ...]} in pixels.
    """
    boxes = boxes or {}
    z_n = hu.shape[0]
    picks = sorted(boxes)[len(boxes) // 2: len(boxes) // 2 + 1] if boxes else []
    if labels is not None:
        for lab in (1, 2, 5):
            ks = np.flatnonzero((labels == lab).any(axis=(1, 2)))
            if len(ks):
                picks.append(int(ks[len(ks) // 2]))
    picks = (picks + [z_n // 4, z_n // 2, 3 * z_n // 4])[:3]
    fig, axes = plt.subplots(2, 4, figsize=(16, 8))
    bone, soft = SEED002_WINDOWS[1], SEED002_WINDOWS[0]
    for i, k in enumerate(picks):
        for row, win in enumerate((bone, soft)):
            ax = axes[row, i]
            ax.imshow(window(hu[k], win.level, win.width), cmap="gray")
            for x, y, w, h in boxes.get(k, []):
                ax.add_patch(Rectangle((x, y), w, h, fill=False, color="red", lw=1.2))
            ax.set_title(f"slice {k}, {win.name}" + (" (fracture box)" if k in boxes else ""), fontsize=9)
            ax.axis("off")
    column = None
    if labels is not None:
        cols = np.nonzero((labels >= 1) & (labels <= 7))[2]
        column = int(np.median(cols)) if len(cols) else None
    column = hu.shape[2] // 2 if column is None else column
    aspect = spacing[0] / spacing[1]
    for row, win in enumerate((bone, soft)):
        ax = axes[row, 3]
        ax.imshow(window(hu[:, :, column], win.level, win.width), cmap="gray", aspect=aspect)
        if labels is not None and row == 0:
            _overlay(ax, labels[:, :, column], aspect)
        ax.set_title(f"sagittal column {column}" + (" + labels" if labels is not None and row == 0 else ""),
                     fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_loss_curves(histories, title: str = "loss curves"):
    """Train (solid) and validation (dashed) loss per epoch, one colour per fold, one panel per model.

    histories: DataFrame with model, fold, epoch, train_loss and optionally valid_loss.
    """
    models = list(dict.fromkeys(histories["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        part = histories[histories["model"] == model]
        for i, (fold, h) in enumerate(part.groupby("fold")):
            color = f"C{i}"
            ax.plot(h.epoch, h.train_loss, color=color, label=f"fold {fold} train")
            if "valid_loss" in h:
                ax.plot(h.epoch, h.valid_loss, color=color, ls="--", label=f"fold {fold} valid")
        ax.set_title(model)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_slice_labels(slices, uid: str, models: tuple[str, ...] = ("true", "rf", "cnn", "seq")):
    """Per-slice C1..C7 along the slice axis (head at the left) for one study: truth and each model's probability
    (seq: the CNN + BiGRU).

    slices: DataFrame with uid, z and columns `{model}_C1..C7`; models without columns there are left out.
    """
    models = tuple(m for m in models if f"{m}_C1" in slices)
    part = slices[slices["uid"] == uid].sort_values("z")
    fig, axes = plt.subplots(len(models), 1, figsize=(12, 1.6 * len(models)), squeeze=False, sharex=True)
    for ax, model in zip(axes[:, 0], models, strict=True):
        values = part[[f"{model}_C{k}" for k in range(1, 8)]].to_numpy(dtype=float).T
        ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(7), [f"C{k}" for k in range(1, 8)], fontsize=7)
        ax.set_ylabel({"true": "truth", "rf": "RF", "cnn": "CNN", "seq": "CNN+BiGRU"}.get(model, model), fontsize=8)
    axes[-1, 0].set_xlabel("slice (head first)")
    fig.suptitle(f"{uid}: vertebrae along the slice axis")
    fig.tight_layout()
    return fig


def plot_roc(labels, predictions: dict, targets: tuple[str, ...] | None = None):
    """ROC curves per target, one line per model. labels and each prediction: wide per-study tables."""
    from sklearn.metrics import roc_auc_score, roc_curve

    targets = targets or tuple([f"C{k}" for k in range(1, 8)] + ["patient_overall"])
    fig, axes = plt.subplots(2, 4, figsize=(16, 8))
    for ax, t in zip(axes.ravel(), targets, strict=True):
        for name, pred in predictions.items():
            merged = labels[["StudyInstanceUID", t]].merge(pred[["StudyInstanceUID", t]], on="StudyInstanceUID",
                                                           suffixes=("_true", "_pred"))
            y, p = merged[f"{t}_true"], merged[f"{t}_pred"]
            if 0 < y.sum() < len(y):
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, label=f"{name} AUC {roc_auc_score(y, p):.3f}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls=":")
        ax.set_title(t)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_fracture_boxes(image: np.ndarray, original_size: tuple[int, int], predicted: list[tuple],
                        true: list[tuple], cam: np.ndarray | None = None, cam_box: tuple | None = None,
                        title: str = ""):
    """One slice (uint8 [S, S]) drawn in DICOM pixel coordinates, the Grad-CAM heatmap over its crop, predicted
    boxes in red and true boxes in green, each (x, y, width, height) in DICOM pixels."""
    h, w = original_size
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(image, cmap="gray", extent=(0, w, h, 0))
    if cam is not None and cam_box is not None:
        x0, y0, x1, y1 = cam_box
        ax.imshow(cam, cmap="jet", alpha=0.35, extent=(x0, x1, y1, y0), vmin=0, vmax=1)
    for boxes, color in ((predicted, "red"), (true, "lime")):
        for x, y, bw, bh in boxes:
            ax.add_patch(Rectangle((x, y), bw, bh, fill=False, color=color, lw=1.5))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return fig


def plot_occlusion(volume: np.ndarray, drops: np.ndarray, title: str = ""):
    """Occlusion sensitivity over a volume uint8 [C, D, H, W]: the depth profile, and the in-plane map of the most
    sensitive depth block over that block's middle slice."""
    c, d, h, w = volume.shape
    profile = drops.max(axis=(1, 2))
    k = int(np.argmax(profile))
    z = min(int((k + 0.5) * d / len(profile)), d - 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(np.arange(len(profile)) * d / len(profile), profile, width=d / len(profile), align="edge")
    axes[0].set_xlabel("depth (slices, C1 first)")
    axes[0].set_ylabel("logit drop")
    axes[1].imshow(volume[min(1, c - 1), z], cmap="gray", extent=(0, w, h, 0))
    axes[1].imshow(drops[k], cmap="jet", alpha=0.4, extent=(0, w, h, 0))
    axes[1].set_title(f"depth {z}")
    axes[1].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
