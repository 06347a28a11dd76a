"""Blending the models' out-of-fold predictions: weights per label chosen to minimise the competition metric,
checked by cross-validation over studies, beside simple averaging and the best single model.

The metric is separable by column: each study's normalising weight depends on its labels only, so the weights
of one target column can be searched alone.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kernel_utils.blend.calibration import apply_calibration, fit_calibration
from kernel_utils.blend.prior import predict_constant
from kernel_utils.folds import make_folds
from kernel_utils.layout import layout_of
from kernel_utils.metric import NEGATIVE_WEIGHTS, NORMALIZATIONS, POSITIVE_WEIGHTS, TARGETS, competition_loss

EPS = 1e-15


def load_predictions(work_dir: str | os.PathLike) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """{model name: (oof, test)} for every `predictions/<name>_oof.csv` with its `_test.csv`."""
    layout = layout_of(work_dir)
    out = {}
    for oof_path in sorted(layout.predictions.glob("*_oof.csv")):
        name = oof_path.name.removesuffix("_oof.csv")
        test_path = layout.prediction(name, "test")
        if test_path.exists():
            out[name] = (pd.read_csv(oof_path), pd.read_csv(test_path))
    return out


BLEND_ROW, SHARED_ROW, MEAN_ROW = "blend_per_label", "blend_shared", "mean"  # the table's rows besides the models
BLEND_ROWS = {BLEND_ROW: False, SHARED_ROW: True}  # row: fit_weights' `shared`
CALIBRATED = "+calibrated"  # the chosen row's id plus this: the calibrated row
ROW_LABELS = {BLEND_ROW: "weighted blend, weights per label (fitted out of fold)",
              SHARED_ROW: "weighted blend, one weight set for all labels (fitted out of fold)",
              MEAN_ROW: "mean of models"}


def row_label(row: str) -> str:
    """What a row id of the comparison table means, for display ("blend_per_label+calibrated" -> a sentence)."""
    base, calibrated = row.removesuffix(CALIBRATED), row.endswith(CALIBRATED)
    return ROW_LABELS.get(base, base) + (" + calibration (fitted out of fold)" if calibrated else "")


@dataclass
class _Aligned:
    """Labels and every model's out-of-fold predictions over the studies all of them predicted, with the folds
    the blend and the calibration are checked on."""

    truth: pd.DataFrame  # the labels' rows, in `uids` order
    uids: list[str]
    y: np.ndarray  # [N, 8]
    p: np.ndarray  # [M, N, 8]
    study_weight: np.ndarray  # [N]
    folds: np.ndarray  # [N]


def _aligned(labels: pd.DataFrame, preds: dict[str, pd.DataFrame], n_folds: int) -> _Aligned:
    common = set(labels.StudyInstanceUID)
    for p in preds.values():
        common &= set(p.StudyInstanceUID)
    uids = [u for u in labels.StudyInstanceUID if u in common]
    truth = labels.set_index("StudyInstanceUID").loc[uids].reset_index()
    y = truth[TARGETS].to_numpy(float)
    p = np.stack([df.set_index("StudyInstanceUID").loc[uids, TARGETS].to_numpy(float) for df in preds.values()])
    w = np.where(y > 0.5, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS)
    folds = make_folds(truth, n_folds).reindex(uids).to_numpy()
    return _Aligned(truth, uids, y, np.clip(p, EPS, 1 - EPS), w.sum(axis=1), folds)


def _mixed(weights: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-column blend of stacked predictions: weights [8, M], p [M, N, 8] -> [N, 8]."""
    return np.einsum("jm,mnj->nj", weights, p)


def _losses(truth: pd.DataFrame, uids: list[str], probs: np.ndarray) -> dict[str, float]:
    pred = pd.DataFrame(probs, columns=TARGETS).assign(StudyInstanceUID=uids)
    return {f"loss_{n}": competition_loss(truth, pred, n) for n in NORMALIZATIONS}


def simplex_grid(n_models: int, step: float = 0.1) -> np.ndarray:
    """All weight vectors on the simplex with the given step: [G, n_models]."""
    ticks = int(round(1 / step))
    grid = [c for c in itertools.product(range(ticks + 1), repeat=n_models) if sum(c) == ticks]
    return np.array(grid, dtype=float) / ticks


def fit_weights(y: np.ndarray, p: np.ndarray, study_weight: np.ndarray, step: float = 0.1,
                shared: bool = False) -> np.ndarray:
    """Weights [8, M] per target column minimising that column's share of the per-study metric; `shared`: one set
    for every column, minimising the whole metric (M weights fitted instead of 8 M: less to overfit)."""
    grid = simplex_grid(p.shape[0], step)
    losses = np.zeros((8, len(grid)))
    for j in range(8):
        w_lab = np.where(y[:, j] > 0.5, POSITIVE_WEIGHTS[j], NEGATIVE_WEIGHTS[j]) / study_weight
        blend = np.einsum("gm,mn->gn", grid, p[:, :, j])  # [G, N]
        losses[j] = -(y[:, j] * np.log(blend) + (1 - y[:, j]) * np.log(1 - blend)) @ w_lab
    if shared:
        return np.tile(grid[int(np.argmin(losses.sum(axis=0)))], (8, 1))
    return grid[np.argmin(losses, axis=1)]


def blend(preds: list[pd.DataFrame], weights: np.ndarray) -> pd.DataFrame:
    """Weighted per-column blend of wide tables (same studies), weights [8, M]."""
    base = preds[0][["StudyInstanceUID"]].copy()
    arrays = [p.set_index("StudyInstanceUID").loc[base.StudyInstanceUID, TARGETS].to_numpy(float) for p in preds]
    base[TARGETS] = _mixed(weights, np.stack(arrays))
    return base


def compare(labels: pd.DataFrame, oofs: dict[str, pd.DataFrame], n_folds: int = 5,
            step: float = 0.1) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Seed 004's comparison table, extended: every model, their mean, and the weighted blends (weights per label, and
    one set for all labels) whose weights are fitted on the other folds for each held-out fold. Returns the table and
    each blend row's weights [8, M] fitted on all studies."""
    names = list(oofs)
    a = _aligned(labels, oofs, n_folds)
    rows = {name: a.p[i] for i, name in enumerate(names)}
    fitted = {}
    if len(names) > 1:
        rows[MEAN_ROW] = a.p.mean(axis=0)
        for row, shared in BLEND_ROWS.items():
            cv_blend = np.zeros_like(a.y)
            for k in np.unique(a.folds):
                tr, va = a.folds != k, a.folds == k
                w = fit_weights(a.y[tr], a.p[:, tr], a.study_weight[tr], step, shared)
                cv_blend[va] = _mixed(w, a.p[:, va])
            rows[row] = cv_blend
            fitted[row] = fit_weights(a.y, a.p, a.study_weight, step, shared)
    table = pd.DataFrame([{"model": name, **_losses(a.truth, a.uids, arr)} for name, arr in rows.items()])
    return table.set_index("model"), fitted


def calibrated_out_of_fold(labels: pd.DataFrame, oofs: dict[str, pd.DataFrame], weights: np.ndarray | None,
                           n_folds: int = 5, step: float = 0.1, shared: bool = False) -> tuple[dict[str, float],
                                                                                                np.ndarray]:
    """The blend with `weights` [8, M] (None: weights fitted on the other folds, as the table's blend rows, one set for
    all labels when `shared`), calibrated
    per label (`calibration.fit_calibration`) on the other folds for each held-out fold: its losses out of fold, and
    the calibration [8, 2] fitted on all studies."""
    a = _aligned(labels, oofs, n_folds)
    out = np.zeros_like(a.y)
    for k in np.unique(a.folds):
        tr, va = a.folds != k, a.folds == k
        w = weights if weights is not None else fit_weights(a.y[tr], a.p[:, tr], a.study_weight[tr], step, shared)
        params = fit_calibration(a.y[tr], _mixed(w, a.p[:, tr]), a.study_weight[tr])
        out[va] = apply_calibration(_mixed(w, a.p[:, va]), params)
    w = weights if weights is not None else fit_weights(a.y, a.p, a.study_weight, step, shared)
    return _losses(a.truth, a.uids, out), fit_calibration(a.y, _mixed(w, a.p), a.study_weight)


def chosen_weights(table: pd.DataFrame, fitted: dict[str, np.ndarray], names: list[str]) -> tuple[str, np.ndarray]:
    """The row of `compare`'s table with the lowest per-study loss, as blend weights [8, M] over `names`:
    a blend row's weights fitted on all studies, equal weights for the mean, a one-hot column for a single model."""
    choice = str(table.loss_study.idxmin())
    if choice in fitted:
        return choice, fitted[choice]
    if choice == MEAN_ROW:
        return choice, np.full((8, len(names)), 1 / len(names))
    return choice, np.array([[float(n == choice) for n in names]] * 8)


@dataclass
class Ensemble:
    """What `ensemble_with_prior` chose: `compare`'s table with the calibrated row, the model names in weight order,
    the chosen row, its weights [8, M], the calibration [8, 2] when it helped out of fold (else None) and the
    chosen blend of the test predictions (wide)."""

    table: pd.DataFrame
    names: list[str]
    choice: str
    weights: np.ndarray
    calibration: np.ndarray | None
    test: pd.DataFrame


def ensemble_with_prior(labels: pd.DataFrame, models: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
                        oof_prior: pd.DataFrame, prior: dict[str, float], n_folds: int = 5) -> Ensemble:
    """Every model's (oof, test) predictions with the prior as one more model (so the blend may keep it for the
    labels no model beats it on): compared out of fold, the best row chosen, calibrated when that lowers its loss out
    of fold, and its blend of the test studies."""
    models = dict(models)
    test_uids = next(iter(models.values()))[1].StudyInstanceUID
    models["prior"] = (oof_prior.drop(columns="fold", errors="ignore"), predict_constant(prior, test_uids))
    names = list(models)
    oofs = {n: oof for n, (oof, _) in models.items()}
    table, fitted = compare(labels, oofs, n_folds)
    choice, weights = chosen_weights(table, fitted, names)
    refit = choice in BLEND_ROWS  # calibrate the blend as its row was scored: weights fitted on the other folds
    losses, calibration = calibrated_out_of_fold(labels, oofs, None if refit else weights, n_folds,
                                                 shared=BLEND_ROWS.get(choice, False))
    table.loc[choice + CALIBRATED] = losses
    test = blend([models[n][1] for n in names], weights)
    if losses["loss_study"] < table.loc[choice, "loss_study"]:
        test[TARGETS] = apply_calibration(test[TARGETS].to_numpy(float), calibration)
    else:
        calibration = None
    return Ensemble(table, names, choice, weights, calibration, test)
