"""Study folds shared by every model and the prior: stratified by patient_overall and the number of fractures."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from kernel_utils.metric import VERTEBRAE


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
