"""The competition metric: reference values on the real train.csv, a hand-computed case, format helpers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kernel_utils.blend.prior import cross_validate_prior, fit_prior, predict_constant
from kernel_utils.dev.run_summary import ranking_scores
from kernel_utils.folds import make_folds
from kernel_utils.metric import TARGETS, classification_table, competition_loss, long_to_wide, wide_to_long


def _table(uids, rows):
    return pd.DataFrame([[u, *r] for u, r in zip(uids, rows, strict=True)], columns=["StudyInstanceUID", *TARGETS])


def test_reference_values_on_the_real_train_csv(reference):
    train = pd.read_csv(reference / "competition_csv" / "train.csv")
    prevalence = predict_constant({t: train[t].mean() for t in TARGETS}, train.StudyInstanceUID)
    assert competition_loss(train, prevalence) == pytest.approx(0.56382, abs=5e-6)
    assert competition_loss(train, prevalence, normalize="global") == pytest.approx(0.61267, abs=5e-6)
    half = predict_constant(dict.fromkeys(TARGETS, 0.5), train.StudyInstanceUID)
    assert competition_loss(train, half) == pytest.approx(0.693147, abs=1e-6)
    assert competition_loss(train, half, normalize="global") == pytest.approx(0.693147, abs=1e-6)
    smoothed = fit_prior(train)
    assert max(abs(smoothed[t] - train[t].mean()) for t in TARGETS) < 3e-4


def test_hand_computed_two_studies():
    labels = _table(["a", "b"], [[1, 0, 0, 0, 0, 0, 0, 1], [0] * 8])
    preds = _table(["b", "a"], [[0.2] * 8, [0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.8]])  # order differs
    # study a: C1 positive w2 at 0.9, C2..C7 negative w1 at 0.5, overall positive w14 at 0.8
    la = (2 * -np.log(0.9) + 6 * -np.log(0.5) + 14 * -np.log(0.8))
    wa = 2 + 6 + 14
    # study b: all negative at 0.2: C w1 x7, overall w7
    lb = 7 * -np.log(0.8) + 7 * -np.log(0.8)
    wb = 7 + 7
    assert competition_loss(labels, preds) == pytest.approx((la / wa + lb / wb) / 2)
    assert competition_loss(labels, preds, normalize="global") == pytest.approx((la + lb) / (wa + wb))


def test_missing_study_and_nan_are_errors():
    labels = _table(["a", "b"], [[0] * 8, [1] * 8])
    with pytest.raises(ValueError, match="lack 1 studies"):
        competition_loss(labels, _table(["a"], [[0.1] * 8]))
    with pytest.raises(ValueError, match="NaN"):
        competition_loss(labels, _table(["a", "b"], [[0.1] * 8, [np.nan] + [0.5] * 7]))
    with pytest.raises(ValueError, match="normalize"):
        competition_loss(labels, labels, normalize="batch")


def test_long_and_wide_round_trip():
    wide = _table(["1.2.3", "1.2.4"], [list(np.linspace(0.1, 0.8, 8)), list(np.linspace(0.2, 0.9, 8))])
    long = wide_to_long(wide)
    assert len(long) == 16 and "1.2.3_patient_overall" in set(long.row_id)
    back = long_to_wide(long)
    assert np.allclose(back.set_index("StudyInstanceUID").loc[["1.2.3", "1.2.4"], TARGETS].to_numpy(),
                       wide[TARGETS].to_numpy())


def test_seed002_table_values():
    labels = _table(list("abcd"), [[1] * 8, [1] * 8, [0] * 8, [0] * 8])
    preds = _table(list("abcd"), [[0.9] * 8, [0.2] * 8, [0.1] * 8, [0.7] * 8])
    table = classification_table(labels, preds)
    row = table.loc["C1"]
    assert row.sensitivity == 0.5 and row.specificity == 0.5 and row.ppv == 0.5 and row.npv == 0.5
    assert row.accuracy == 0.5 and row.mcc == 0.0 and row.auc == 0.75
    balanced = classification_table(labels, preds, balanced=True)
    assert (balanced.n == 4).all()


def test_a_constant_ranks_nothing_so_its_table_shows_no_auc():
    labels = _table(list("abcd"), [[1] * 8, [1] * 8, [0] * 8, [0] * 8])
    constant = _table(list("abcd"), [[0.3] * 8] * 4)
    assert classification_table(labels, constant).auc.isna().all()
    per_fold = _table(list("abcd"), [[0.30] * 8, [0.31] * 8, [0.29] * 8, [0.30] * 8])  # a prior fitted per fold
    assert classification_table(labels, per_fold).auc.notna().all()
    assert classification_table(labels, per_fold, ranks=False).auc.isna().all()
    assert (classification_table(labels, per_fold, ranks=False).accuracy == 0.5).all()


def test_ranking_scores_of_perfect_and_reversed_predictions():
    labels = _table(list("abcd"), [[1, 0, 1, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0, 0, 1],
                                   [0, 0, 0, 0, 0, 0, 0, 0]])
    perfect = labels.copy()
    perfect[TARGETS] = labels[TARGETS] * 0.8 + 0.1
    reversed_ = labels.copy()
    reversed_[TARGETS] = 0.9 - labels[TARGETS] * 0.8
    assert ranking_scores(labels, perfect) == {"mean_vertebra_auc": 1.0, "patient_auc": 1.0}
    assert ranking_scores(labels, reversed_) == {"mean_vertebra_auc": 0.0, "patient_auc": 0.0}


def test_folds_and_cross_validated_prior(reference):
    train = pd.read_csv(reference / "competition_csv" / "train.csv")
    folds = make_folds(train, 5)
    assert folds.value_counts().between(400, 410).all()
    rates = train.assign(fold=folds.reindex(train.StudyInstanceUID).to_numpy()).groupby("fold").patient_overall.mean()
    assert rates.max() - rates.min() < 0.01
    oof, scores = cross_validate_prior(train, folds)
    assert len(oof) == len(train)
    assert scores.loc["all", "loss_study"] == pytest.approx(0.5640, abs=2e-3)


def test_seed002_case_table_puts_the_papers_figures_beside_the_study_forms():
    from kernel_utils.explain.paper_tables import seed002_case_table

    labels = _table(list("abcd"), [[1] * 8, [1] * 8, [0] * 8, [0] * 8])
    preds = _table(list("abcd"), [[0.9] * 8, [0.2] * 8, [0.1] * 8, [0.7] * 8])
    table = seed002_case_table(labels, preds)
    assert table.loc[("seed 002 (paper, real data)", "as is"), "auc"] == pytest.approx(0.7156)
    assert table.loc[("seed 002 (paper, real data)", "balanced"), "accuracy"] == pytest.approx(0.7106)
    ours = table.loc[("kit, study form (out of fold)", "as is")]
    assert ours.sensitivity == 0.5 and ours.auc == 0.75 and ours.mcc == 0.0
