"""The prior baseline: the training prevalence of every target, and its score out of fold."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kernel_utils.metric import NORMALIZATIONS, TARGETS, competition_loss


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
