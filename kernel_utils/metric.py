"""The competition metric (weighted multi-label log loss) and seed 002's table of classification metrics.

Tables are wide, one row per study: StudyInstanceUID, C1..C7, patient_overall.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

VERTEBRAE = [f"C{i}" for i in range(1, 8)]
TARGETS = VERTEBRAE + ["patient_overall"]
POSITIVE_WEIGHTS = np.array([2.0] * 7 + [14.0])
NEGATIVE_WEIGHTS = np.array([1.0] * 7 + [7.0])
NORMALIZATIONS = ("study", "global")


def _aligned(labels: pd.DataFrame, predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(y, p) float [N, 8] for the studies of `labels`, in its order; errors name missing studies or NaN."""
    for name, df in (("labels", labels), ("predictions", predictions)):
        missing = [c for c in ["StudyInstanceUID", *TARGETS] if c not in df.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}")
    if predictions.StudyInstanceUID.duplicated().any():
        raise ValueError("predictions hold a study twice")
    pred = predictions.set_index("StudyInstanceUID").reindex(labels.StudyInstanceUID)[TARGETS]
    absent = pred.index[pred.isna().all(axis=1)].tolist()
    if absent:
        raise ValueError(f"predictions lack {len(absent)} studies, e.g. {absent[:3]}")
    if pred.isna().any().any():
        raise ValueError("predictions hold NaN")
    return labels[TARGETS].to_numpy(dtype=float), pred.to_numpy(dtype=float)


def competition_loss(labels: pd.DataFrame, predictions: pd.DataFrame, normalize: str = "study",
                     eps: float = 1e-15) -> float:
    """The competition's weighted log loss.

    Weights by the true label: C1-C7 negative 1, positive 2; patient_overall negative 7, positive 14.

    Args:
        labels, predictions: wide per-study tables; predictions must cover every study of labels.
        normalize: "study" (each study's weighted loss over its weight sum, then the mean over studies:
            the de-facto standard, also the MLE-bench grader) or "global" (all weighted losses over all weights).
        eps: probabilities are clipped to [eps, 1 - eps].
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    y, p = _aligned(labels, predictions)
    p = np.clip(p, eps, 1 - eps)
    weights = np.where(y > 0.5, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS)
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p)) * weights
    if normalize == "study":
        return float(np.mean(losses.sum(axis=1) / weights.sum(axis=1)))
    return float(losses.sum() / weights.sum())


def long_to_wide(submission: pd.DataFrame, value: str = "fractured") -> pd.DataFrame:
    """The competition's long format (row_id = <uid>_<C1..C7|patient_overall>, fractured) -> wide per study."""
    parts = submission.row_id.str.split("_", n=1, expand=True)
    long = pd.DataFrame({"StudyInstanceUID": parts[0], "target": parts[1], "value": submission[value].to_numpy()})
    unknown = sorted(set(long.target) - set(TARGETS))
    if unknown:
        raise ValueError(f"row_id suffixes not in {TARGETS}: {unknown[:5]}")
    wide = long.pivot(index="StudyInstanceUID", columns="target", values="value")
    return wide.reindex(columns=TARGETS).reset_index().rename_axis(columns=None)


def wide_to_long(predictions: pd.DataFrame) -> pd.DataFrame:
    """Wide per-study table -> row_id, fractured (8 rows a study)."""
    long = predictions.melt(id_vars="StudyInstanceUID", value_vars=TARGETS, var_name="target", value_name="fractured")
    return pd.DataFrame({"row_id": long.StudyInstanceUID + "_" + long.target, "fractured": long.fractured})


def auc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC, or NaN where it means nothing: labels of one class only, or a constant prediction."""
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) and np.ptp(p) > 0 else float("nan")


def _binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float, ranks: bool = True) -> dict[str, float]:
    pred = p >= threshold
    tp, tn = float(np.sum(pred & (y == 1))), float(np.sum(~pred & (y == 0)))
    fp, fn = float(np.sum(pred & (y == 0))), float(np.sum(~pred & (y == 1)))

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    sens, spec, ppv, npv = ratio(tp, tp + fn), ratio(tn, tn + fp), ratio(tp, tp + fp), ratio(tn, tn + fn)
    mcc_den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "sensitivity": sens, "specificity": spec, "ppv": ppv, "npv": npv,
        "f1": ratio(2 * tp, 2 * tp + fp + fn), "accuracy": ratio(tp + tn, len(y)),
        "mcc": ratio(tp * tn - fp * fn, mcc_den),
        "auc": auc_or_nan(y, p) if ranks else float("nan"),
        "positives": int(y.sum()), "n": len(y),
    }


def classification_table(labels: pd.DataFrame, predictions: pd.DataFrame, threshold: float = 0.5,
                         balanced: bool = False, seed: int = 0, ranks: bool = True) -> pd.DataFrame:
    """Seed 002's table: sensitivity, specificity, PPV, NPV, F1, accuracy, MCC and AUC per target.

    With `balanced`, each target is scored on a subsample with as many negatives as positives (the larger
    class drawn down at random with `seed`), as seed 002 reports beside the data as it is. The AUC is NaN for a
    constant prediction and, with `ranks=False`, for a predictor that ranks nothing although its values differ
    (the prior fitted per fold: its values differ only between folds).
    """
    y, p = _aligned(labels, predictions)
    rng = np.random.default_rng(seed)
    rows = {}
    for j, target in enumerate(TARGETS):
        idx = np.arange(len(y))
        if balanced:
            pos, neg = idx[y[:, j] == 1], idx[y[:, j] == 0]
            m = min(len(pos), len(neg))
            idx = np.concatenate([rng.choice(pos, m, replace=False), rng.choice(neg, m, replace=False)])
        rows[target] = _binary_metrics(y[idx, j], p[idx, j], threshold, ranks)
    return pd.DataFrame(rows).T
