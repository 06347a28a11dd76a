"""Blending the models' out-of-fold predictions: weights per label chosen to minimise the competition metric,
checked by cross-validation over studies, beside simple averaging and the best single model.

The metric is separable by column: each study's normalising weight depends on its labels only, so the weights
of one target column can be searched alone.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd

from kernel_utils.baseline import make_folds
from kernel_utils.metric import NEGATIVE_WEIGHTS, NORMALIZATIONS, POSITIVE_WEIGHTS, TARGETS, competition_loss

EPS = 1e-15


def load_predictions(work_dir: str | os.PathLike) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """{model name: (oof, test)} for every `predictions/<name>_oof.csv` with its `_test.csv`."""
    folder = Path(work_dir) / "predictions"
    out = {}
    for oof_path in sorted(folder.glob("*_oof.csv")):
        name = oof_path.name.removesuffix("_oof.csv")
        test_path = folder / f"{name}_test.csv"
        if test_path.exists():
            out[name] = (pd.read_csv(oof_path), pd.read_csv(test_path))
    return out


def _stack(labels: pd.DataFrame, preds: dict[str, pd.DataFrame]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y [N, 8], p [M, N, 8], study weight sums [N]) over the studies every model predicted."""
    common = set(labels.StudyInstanceUID)
    for p in preds.values():
        common &= set(p.StudyInstanceUID)
    uids = [u for u in labels.StudyInstanceUID if u in common]
    y = labels.set_index("StudyInstanceUID").loc[uids, TARGETS].to_numpy(float)
    p = np.stack([df.set_index("StudyInstanceUID").loc[uids, TARGETS].to_numpy(float) for df in preds.values()])
    w = np.where(y > 0.5, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS)
    return y, np.clip(p, EPS, 1 - EPS), w.sum(axis=1)


def simplex_grid(n_models: int, step: float = 0.1) -> np.ndarray:
    """All weight vectors on the simplex with the given step: [G, n_models]."""
    ticks = int(round(1 / step))
    grid = [c for c in itertools.product(range(ticks + 1), repeat=n_models) if sum(c) == ticks]
    return np.array(grid, dtype=float) / ticks


def fit_weights(y: np.ndarray, p: np.ndarray, study_weight: np.ndarray, step: float = 0.1) -> np.ndarray:
    """Weights [8, M] per target column minimising that column's share of the per-study metric."""
    grid = simplex_grid(p.shape[0], step)
    weights = np.zeros((8, p.shape[0]))
    for j in range(8):
        w_lab = np.where(y[:, j] > 0.5, POSITIVE_WEIGHTS[j], NEGATIVE_WEIGHTS[j]) / study_weight
        blend = np.einsum("gm,mn->gn", grid, p[:, :, j])  # [G, N]
        loss = -(y[:, j] * np.log(blend) + (1 - y[:, j]) * np.log(1 - blend)) @ w_lab
        weights[j] = grid[int(np.argmin(loss))]
    return weights


def blend(preds: list[pd.DataFrame], weights: np.ndarray) -> pd.DataFrame:
    """Weighted per-column blend of wide tables (same studies), weights [8, M]."""
    base = preds[0][["StudyInstanceUID"]].copy()
    arrays = [p.set_index("StudyInstanceUID").loc[base.StudyInstanceUID, TARGETS].to_numpy(float) for p in preds]
    stacked = np.stack(arrays)  # [M, N, 8]
    base[TARGETS] = np.einsum("jm,mnj->nj", weights, stacked)
    return base


def compare(labels: pd.DataFrame, oofs: dict[str, pd.DataFrame], n_folds: int = 5,
            step: float = 0.1) -> tuple[pd.DataFrame, np.ndarray]:
    """Seed 004's comparison table, extended: every model, their mean, and the weighted blend whose weights
    are fitted on the other folds for each held-out fold. Returns the table and the weights fitted on all."""
    names = list(oofs)
    y, p, sw = _stack(labels, oofs)
    common = labels[labels.StudyInstanceUID.isin(oofs[names[0]].StudyInstanceUID)]
    uids = [u for u in labels.StudyInstanceUID if u in set(common.StudyInstanceUID)]
    truth = labels.set_index("StudyInstanceUID").loc[uids].reset_index()
    folds = make_folds(truth, n_folds).reindex(uids).to_numpy()
    cv_blend = np.zeros_like(y)
    for k in np.unique(folds):
        tr, va = folds != k, folds == k
        w = fit_weights(y[tr], p[:, tr], sw[tr], step)
        cv_blend[va] = np.einsum("jm,mnj->nj", w, p[:, va])
    rows = {}
    for i, name in enumerate(names):
        rows[name] = p[i]
    if len(names) > 1:
        rows["mean of models"] = p.mean(axis=0)
        rows["weighted blend (weights fitted out of fold)"] = cv_blend
    table = []
    for name, arr in rows.items():
        pred = pd.DataFrame(arr, columns=TARGETS).assign(StudyInstanceUID=uids)
        table.append({"model": name, **{f"loss_{n}": competition_loss(truth, pred, n) for n in NORMALIZATIONS}})
    return pd.DataFrame(table).set_index("model"), fit_weights(y, p, sw, step)


def chosen_weights(table: pd.DataFrame, fitted: np.ndarray, names: list[str]) -> tuple[str, np.ndarray]:
    """The row of `compare`'s table with the lowest per-study loss, as blend weights [8, M] over `names`:
    the fitted weights for the blend, equal weights for the mean, a one-hot column for a single model."""
    choice = str(table.loss_study.idxmin())
    if choice == "weighted blend (weights fitted out of fold)":
        return choice, fitted
    if choice == "mean of models":
        return choice, np.full((8, len(names)), 1 / len(names))
    return choice, np.array([[float(n == choice) for n in names]] * 8)
