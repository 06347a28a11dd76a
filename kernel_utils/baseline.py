"""The prior baseline (training prevalence per target) and study folds shared by every model."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from kernel_utils.metric import NORMALIZATIONS, TARGETS, VERTEBRAE, competition_loss


def fit_prior(labels: pd.DataFrame, smoothing: float = 0.5) -> dict[str, float]:
    """Training prevalence of every target, (positives + s) / (studies + 2 s): the best guess without images.

    The smoothing (Jeffreys' 0.5 by default) keeps a target never seen positive in a small training set
    away from 0; on the 2019 real studies it moves no prevalence by more than 0.0003.
    """
    n = len(labels)
    return {t: float((labels[t].sum() + smoothing) / (n + 2 * smoothing)) for t in TARGETS}


def predict_constant(values: dict[str, float], uids) -> pd.DataFrame:
    """A wide prediction table giving every study the same probabilities."""
    uids = list(uids)
    return pd.DataFrame({"StudyInstanceUID": uids, **{t: np.full(len(uids), values[t]) for t in TARGETS}})


def make_folds(labels: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> pd.Series:
    """Fold of every study (index StudyInstanceUID), stratified by patient_overall and the number of fractures.

    One row per study, so the folds are grouped by study by construction.
    """
    n_fractured = labels[VERTEBRAE].sum(axis=1).clip(upper=2)
    strata = labels.patient_overall.astype(str) + "_" + n_fractured.astype(str)
    counts = strata.value_counts()
    strata = strata.where(strata.map(counts) >= n_folds, labels.patient_overall.astype(str))
    folds = np.zeros(len(labels), dtype=int)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # tiny datasets: a class smaller than n_folds is expected
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, valid) in enumerate(splitter.split(np.zeros(len(labels)), strata)):
            folds[valid] = k
    return pd.Series(folds, index=labels.StudyInstanceUID.to_numpy(), name="fold")


def cross_validate_prior(labels: pd.DataFrame, folds: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Out-of-fold predictions of the prior and its score per fold (both normalisations) and overall."""
    oof = []
    for k in sorted(folds.unique()):
        valid = folds.reindex(labels.StudyInstanceUID).to_numpy() == k
        oof.append(predict_constant(fit_prior(labels[~valid]), labels.StudyInstanceUID[valid]).assign(fold=k))
    oof = pd.concat(oof, ignore_index=True)
    rows = []
    for k, part in oof.groupby("fold"):
        truth = labels[labels.StudyInstanceUID.isin(part.StudyInstanceUID)]
        rows.append({"fold": k, "studies": len(part),
                     **{f"loss_{n}": competition_loss(truth, part, n) for n in NORMALIZATIONS}})
    rows.append({"fold": "all", "studies": len(oof),
                 **{f"loss_{n}": competition_loss(labels, oof, n) for n in NORMALIZATIONS}})
    return oof, pd.DataFrame(rows).set_index("fold")
