"""Per-label temperature and shift: the fit recovers a known miscalibration under the competition weights."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kernel_utils.blend.calibration import IDENTITY, apply_calibration, fit_calibration
from kernel_utils.metric import TARGETS


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_fit_recovers_temperature_and_the_weighted_shift():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (40000, 8))
    y = (rng.random(z.shape) < _sigmoid(z)).astype(float)
    p = _sigmoid(2 * z + 1)  # overconfident and shifted
    params = fit_calibration(y, p, np.ones(len(y)))
    # a study weight of 1: positives weigh 2:1, so the best logit is z + log 2 = (logit p - 1) / 2 + log 2
    assert np.allclose(params[:, 0], 0.5, atol=0.03)
    assert np.allclose(params[:, 1], -0.5 + np.log(2), atol=0.05)
    calibrated = apply_calibration(p, params)
    assert np.allclose(calibrated, _sigmoid(z + np.log(2)), atol=0.03)


def test_identity_one_class_and_backwards_columns():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.99, (50, 8))
    assert np.allclose(apply_calibration(p, np.tile(IDENTITY, (8, 1))), p)
    y = (rng.random((50, 8)) < p).astype(float)
    y[:, 2] = 0  # no positive: nothing to fit
    y[:, 3] = (p[:, 3] < 0.5).astype(float)  # ranked backwards: the best monotone fit is a constant
    params = fit_calibration(y, p, np.ones(50))
    assert tuple(params[2]) == IDENTITY and not np.allclose(params[0], IDENTITY)
    weighted_mean = 2 * y[:, 3].sum() / (2 * y[:, 3].sum() + (1 - y[:, 3]).sum())
    assert params[3, 0] == 0 and np.allclose(apply_calibration(p, params)[:, 3], weighted_mean)


def test_ensemble_calibrates_a_squashed_model_and_its_test_predictions():
    from kernel_utils.blend.ensemble import CALIBRATED, ensemble_with_prior
    from kernel_utils.blend.prior import cross_validate_prior, fit_prior
    from kernel_utils.folds import make_folds

    rng = np.random.default_rng(2)
    n = 600
    y = (rng.random((n, 8)) < 0.25).astype(float)
    y[:, 7] = y[:, :7].max(axis=1)
    uids = [f"1.3.{i}" for i in range(n)]
    labels = pd.DataFrame(y.astype(int), columns=TARGETS).assign(StudyInstanceUID=uids)
    squashed = 0.5 + 0.04 * (y - 0.5) + rng.normal(0, 0.01, y.shape)  # ranks well, probabilities near 0.5
    oof = pd.DataFrame(squashed, columns=TARGETS).assign(StudyInstanceUID=uids)
    test = oof.iloc[:40].assign(StudyInstanceUID=[f"8.8.{i}" for i in range(40)])
    oof_prior, _ = cross_validate_prior(labels, make_folds(labels, 4))
    ens = ensemble_with_prior(labels, {"squashed": (oof, test)}, oof_prior, fit_prior(labels), 4)
    row = ens.choice + CALIBRATED
    assert ens.table.loss_study[row] < 0.7 * ens.table.loss_study[ens.choice]
    assert ens.calibration is not None and (ens.calibration[:7, 0] > 5).all()  # C1-C7 spread out
    expected = apply_calibration(
        np.einsum("jm,mnj->nj", ens.weights,
                  np.stack([test[TARGETS].to_numpy(), np.tile([fit_prior(labels)[t] for t in TARGETS], (40, 1))])),
        ens.calibration)
    assert np.allclose(ens.test[TARGETS].to_numpy(), expected)
    assert ens.test[TARGETS].to_numpy()[test[TARGETS].to_numpy() > 0.5].mean() > 0.8


def test_perfectly_separated_column_is_sharpened_a_finite_amount():
    """Out-of-fold predictions that separate a label's classes perfectly have no finite unpenalised optimum; the
    prior on the stretch keeps 1 / T moderate, and a held-out prediction on the wrong side is not made certain."""
    rng = np.random.default_rng(3)
    y = (rng.random((300, 8)) < 0.3).astype(float)
    p = _sigmoid(np.where(y > 0.5, 1.0, -1.0) * rng.uniform(0.5, 3.0, y.shape))  # every positive above every negative
    from kernel_utils.metric import NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS

    params = fit_calibration(y, p, np.where(y > 0.5, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS).sum(axis=1))
    assert (params[:, 0] > 1).all() and (params[:, 0] < 10).all()  # unpenalised: about 20, growing
    wrong_side = apply_calibration(np.full((1, 8), _sigmoid(-1.0)), params)  # a positive the model scored at 0.27
    assert (wrong_side > 1e-4).all()
