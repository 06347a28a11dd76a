"""Calibration of blended probabilities, one temperature and one shift per label: p' = sigmoid(logit(p) / T + b).

Each column is fitted alone (the metric is separable by column: a study's normalising weight depends on its labels
only) as a weighted logistic regression on logit(p), with the competition's label weights over each study's weight
sum as sample weights. The shift matters here: under those weights the best constant is not the prevalence (on the
real train.csv, C1 0.103 against a prevalence of 0.073), so a model or a blend with the prior can sit below it.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.linear_model import LogisticRegression

from kernel_utils.metric import NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS

log = logging.getLogger(__name__)
EPS = 1e-6
IDENTITY = (1.0, 0.0)  # (1 / T, b): leaves probabilities as they are


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def label_weights(y: np.ndarray, study_weight: np.ndarray) -> np.ndarray:
    """Per-study metric weight of every label, [N, 8]: the competition weight by the true label over the study's sum."""
    return np.where(y > 0.5, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS) / study_weight[:, None]


def fit_calibration(y: np.ndarray, p: np.ndarray, study_weight: np.ndarray) -> np.ndarray:
    """(1 / T, b) per column, [8, 2], minimising each column's share of the per-study metric.

    y, p: [N, 8] labels and probabilities; study_weight: [N] the sum of each study's label weights. A column with one
    class only keeps the identity. Where the fit would invert the ranking (1 / T < 0) the best fit with 1 / T >= 0
    lies on 1 / T = 0 (the loss is convex): the constant that minimises the column's weighted loss."""
    weights = label_weights(y, study_weight)
    params = np.tile(IDENTITY, (y.shape[1], 1))
    for j in range(y.shape[1]):
        if len(np.unique(y[:, j] > 0.5)) < 2:
            continue
        fit = LogisticRegression(C=np.inf, max_iter=1000)
        fit.fit(_logit(p[:, j])[:, None], (y[:, j] > 0.5).astype(int), sample_weight=weights[:, j])
        a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
        if a < 0:
            log.debug("label %d: the fit would invert the ranking (1/T = %.3f): the best constant instead", j, a)
            a, b = 0.0, float(_logit(np.float64((weights[:, j] * y[:, j]).sum() / weights[:, j].sum())))
        params[j] = (a, b)
    return params


def apply_calibration(p: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Calibrated probabilities [N, 8] from p [N, 8] and params [8, 2] (1 / T, b)."""
    return 1.0 / (1.0 + np.exp(-(_logit(p) * params[:, 0] + params[:, 1])))
