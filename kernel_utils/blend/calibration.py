"""Calibration of blended probabilities, one temperature and one shift per label: p' = sigmoid(logit(p) / T + b).

Each column is fitted alone (the metric is separable by column: a study's normalising weight depends on its labels
only) as a weighted logistic regression on logit(p), with the competition's label weights over each study's weight
sum as sample weights, and a weak Gaussian prior on 1 / T around 1: where a label's out-of-fold predictions separate
its classes perfectly the unpenalised fit has no finite optimum and sharpens without bound (what the prior changed
is in benchmarks/README.md, "Seed 004's comparison").

The shift matters here: under those weights the best constant is not the prevalence (on the real train.csv, C1
0.103 against a prevalence of 0.073), so a model or a blend with the prior can sit below it.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize

from kernel_utils.metric import NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS

log = logging.getLogger(__name__)
EPS = 1e-6
IDENTITY = (1.0, 0.0)  # (1 / T, b): leaves probabilities as they are
SLOPE_PRIOR = 0.01  # see _fit_column; a column's weights sum to about 14 on the bench set's 240 studies, 120 on the
# real 2,019


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def label_weights(y: np.ndarray, study_weight: np.ndarray) -> np.ndarray:
    """Per-study metric weight of every label, [N, 8]: the competition weight by the true label over the study's sum."""
    return np.where(y > 0.5, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS) / study_weight[:, None]


def _fit_column(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(1 / T, b) minimising sum w * BCE(sigmoid(x / T + b), y) + SLOPE_PRIOR / 2 * ((1 / T - 1) * spread(x))^2 with
    1 / T >= 0; x: [N] logits, spread: their weighted standard deviation (the prior is on how far the calibration
    stretches the logits, so a model squashed near 0.5 may still be stretched a lot). Convex: L-BFGS-B from the
    identity finds the optimum."""
    spread2 = float(np.average((x - np.average(x, weights=w)) ** 2, weights=w))
    strength = SLOPE_PRIOR * spread2

    def loss_and_grad(v: np.ndarray) -> tuple[float, np.ndarray]:
        z = v[0] * x + v[1]
        residual = w * (1.0 / (1.0 + np.exp(-z)) - y)
        loss = float((w * (np.logaddexp(0.0, z) - y * z)).sum() + strength / 2 * (v[0] - 1.0) ** 2)
        return loss, np.array([(residual * x).sum() + strength * (v[0] - 1.0), residual.sum()])

    fit = minimize(loss_and_grad, np.array(IDENTITY), jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)])
    return float(fit.x[0]), float(fit.x[1])


def fit_calibration(y: np.ndarray, p: np.ndarray, study_weight: np.ndarray) -> np.ndarray:
    """(1 / T, b) per column, [8, 2], minimising each column's share of the per-study metric (with the slope prior).

    y, p: [N, 8] labels and probabilities; study_weight: [N] the sum of each study's label weights. A column with one
    class only keeps the identity. Where the fit would invert the ranking (1 / T < 0) the best fit with 1 / T >= 0
    lies on 1 / T = 0 (the loss is convex): the constant that minimises the column's weighted loss."""
    weights = label_weights(y, study_weight)
    params = np.tile(IDENTITY, (y.shape[1], 1))
    for j in range(y.shape[1]):
        if len(np.unique(y[:, j] > 0.5)) < 2:
            continue
        a, b = _fit_column(_logit(p[:, j]), (y[:, j] > 0.5).astype(float), weights[:, j])
        if a <= 1e-6:
            log.debug("label %d: the fit would invert the ranking: the best constant instead", j)
            a, b = 0.0, float(_logit(np.float64((weights[:, j] * y[:, j]).sum() / weights[:, j].sum())))
        params[j] = (a, b)
    return params


def apply_calibration(p: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Calibrated probabilities [N, 8] from p [N, 8] and params [8, 2] (1 / T, b)."""
    return 1.0 / (1.0 + np.exp(-(_logit(p) * params[:, 0] + params[:, 1])))
