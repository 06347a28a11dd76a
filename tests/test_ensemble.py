"""The blend: the weight search recovers the better model; the table compares models, mean and blend."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kernel_utils.blend.ensemble import (
    BLEND_ROW,
    BLEND_ROWS,
    MEAN_ROW,
    SHARED_ROW,
    blend,
    compare,
    fit_weights,
    simplex_grid,
)
from kernel_utils.metric import TARGETS


def _constructed(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 8)) < 0.3).astype(float)
    y[:, 7] = y[:, :7].max(axis=1)
    uids = [f"1.2.{i}" for i in range(n)]
    labels = pd.DataFrame(y.astype(int), columns=TARGETS).assign(StudyInstanceUID=uids)
    good = np.clip(np.where(y > 0.5, 0.8, 0.2) + rng.normal(0, 0.05, y.shape), 0.01, 0.99)
    noise = np.clip(rng.random(y.shape), 0.01, 0.99)
    to_df = lambda a: pd.DataFrame(a, columns=TARGETS).assign(StudyInstanceUID=uids)  # noqa: E731
    return labels, to_df(good), to_df(noise)


def test_weight_search_recovers_the_better_model():
    labels, good, noise = _constructed()
    y = labels[TARGETS].to_numpy(float)
    p = np.stack([noise[TARGETS].to_numpy(), good[TARGETS].to_numpy()])
    sw = np.where(y > 0.5, [2] * 7 + [14], [1] * 7 + [7]).sum(axis=1)
    w = fit_weights(y, p, sw)
    assert (w[:, 1] >= 0.9).all() and np.allclose(w.sum(axis=1), 1)
    assert len(simplex_grid(3, 0.5)) == 6


def test_comparison_table_and_blend():
    labels, good, noise = _constructed()
    table, weights = compare(labels, {"noise": noise, "good": good}, n_folds=4)
    assert set(table.index) == {"noise", "good", MEAN_ROW, *BLEND_ROWS}
    assert table.loss_study["good"] < table.loss_study[MEAN_ROW] < table.loss_study["noise"]
    for row in BLEND_ROWS:
        assert table.loss_study[row] <= table.loss_study["good"] + 0.01
    assert (weights[SHARED_ROW] == weights[SHARED_ROW][0]).all()  # one set, every label
    mixed = blend([noise, good], weights[BLEND_ROW])
    assert list(mixed.StudyInstanceUID) == list(good.StudyInstanceUID)
    assert np.allclose(mixed[TARGETS].to_numpy(), good[TARGETS].to_numpy(), atol=0.2)


def test_chosen_weights_follow_the_best_row():
    from kernel_utils.blend.ensemble import chosen_weights

    per_label = np.tile([0.3, 0.7], (8, 1))
    per_label[0] = [0.9, 0.1]
    fitted = {BLEND_ROW: per_label, SHARED_ROW: np.tile([0.4, 0.6], (8, 1))}
    table = pd.DataFrame({"loss_study": [0.5, 0.4, 0.45, 0.42, 0.43]},
                         index=["a", "b", MEAN_ROW, BLEND_ROW, SHARED_ROW])
    choice, w = chosen_weights(table, fitted, ["a", "b"])
    assert choice == "b" and (w == [0.0, 1.0]).all()
    choice, w = chosen_weights(table.assign(loss_study=[0.5, 0.6, 0.45, 0.3, 0.31]), fitted, ["a", "b"])
    assert choice == BLEND_ROW and np.array_equal(w, per_label)
    choice, w = chosen_weights(table.assign(loss_study=[0.5, 0.6, 0.45, 0.3, 0.29]), fitted, ["a", "b"])
    assert choice == SHARED_ROW and np.allclose(w, [0.4, 0.6])
    choice, w = chosen_weights(table.assign(loss_study=[0.5, 0.6, 0.2, 0.3, 0.3]), fitted, ["a", "b"])
    assert choice == MEAN_ROW and np.allclose(w, 0.5)


def test_ensemble_with_prior_compares_blends_and_predicts_the_test_studies():
    from kernel_utils.blend.calibration import apply_calibration
    from kernel_utils.blend.ensemble import CALIBRATED, ensemble_with_prior
    from kernel_utils.blend.prior import cross_validate_prior, fit_prior
    from kernel_utils.folds import make_folds

    labels, good, noise = _constructed()
    oof_prior, _ = cross_validate_prior(labels, make_folds(labels, 4))
    test = good.iloc[:50].assign(StudyInstanceUID=[f"9.9.{i}" for i in range(50)])
    both = ensemble_with_prior(labels, {"good": (good, test), "noise": (noise, test)}, oof_prior, fit_prior(labels), 4)
    assert both.names == ["good", "noise", "prior"] and "prior" in both.table.index
    assert both.table.loss_study["good"] < both.table.loss_study["prior"] < both.table.loss_study["noise"]
    assert both.choice != "noise" and both.choice != "prior"
    assert list(both.test.StudyInstanceUID) == list(test.StudyInstanceUID)
    assert np.allclose(both.weights.sum(axis=1), 1) and (both.weights[:, 1] <= 0.1).all()
    alone = ensemble_with_prior(labels, {"noise": (noise, test)}, oof_prior, fit_prior(labels), 4)
    assert alone.choice != "noise" and alone.weights[:, 1].mean() > 0.5  # the prior's column carries the blend
    mixed = alone.weights[0, 0] * test["C1"] + alone.weights[0, 1] * fit_prior(labels)["C1"]
    if alone.calibration is not None:
        mixed = apply_calibration(np.tile(mixed.to_numpy()[:, None], (1, 8)), alone.calibration)[:, 0]
    assert np.allclose(alone.test[TARGETS].to_numpy()[:, 0], mixed)
    assert alone.table.index[-1] == alone.choice + CALIBRATED


def test_stage_timing_splits_data_from_model_time(monkeypatch):
    import kernel_utils.submit.timing as submit

    now = [0.0]
    monkeypatch.setattr(submit.time, "perf_counter", lambda: now[0])

    def slow_items():
        for item in range(3):
            now[0] += 2.0  # 2 s to read each item
            yield item

    timing = submit.StageTiming()
    timing.add("load_and_window", data=6.0)
    with timing.stage("localise") as clock:
        for _ in clock.timed_data(slow_items()):
            now[0] += 1.0  # 1 s of network per item
    with timing.stage("vit") as clock:
        with clock.data():
            now[0] += 3.0
        now[0] += 9.0
    for _ in timing.timed_stage("read_cache", slow_items()):
        now[0] += 5.0  # not part of reading
    table = timing.per_study(3)
    assert table.loc["read_cache"].tolist() == [2.0, 0.0, 2.0]
    assert table.loc["load_and_window"].tolist() == [2.0, 0.0, 2.0]
    assert table.loc["localise"].tolist() == [2.0, 1.0, 3.0]
    assert table.loc["vit"].tolist() == [1.0, 3.0, 4.0]
    assert timing.data_share() == (6 + 6 + 3 + 6) / (6 + 9 + 12 + 6)


def test_two_equal_models_with_independent_errors_blend_below_both():
    """Averaging two models whose errors are independent lowers the loss: both weight searches find about half
    and half, and out of fold both blends score below either model."""
    labels, _, _ = _constructed(n=600, seed=1)
    y = labels[TARGETS].to_numpy(float)
    rng = np.random.default_rng(2)
    logit = lambda: np.where(y > 0.5, 1.0, -1.0) + rng.normal(0, 1.2, y.shape)  # noqa: E731
    uids = labels.StudyInstanceUID
    a, b = (pd.DataFrame(1 / (1 + np.exp(-logit())), columns=TARGETS).assign(StudyInstanceUID=uids) for _ in "ab")
    table, fitted = compare(labels, {"a": a, "b": b}, n_folds=5)
    for row in BLEND_ROWS:
        assert table.loss_study[row] < min(table.loss_study["a"], table.loss_study["b"]), row
    assert 0.3 <= fitted[SHARED_ROW][0, 0] <= 0.7


def test_per_label_weights_follow_each_label_shared_weights_cannot():
    labels, good, noise = _constructed()
    y = labels[TARGETS].to_numpy(float)
    first = good[TARGETS].to_numpy().copy()
    second = noise[TARGETS].to_numpy().copy()
    first[:, 4:], second[:, 4:] = second[:, 4:], good[TARGETS].to_numpy()[:, 4:]  # each good on its own labels
    p = np.stack([first, second])
    sw = np.where(y > 0.5, [2] * 7 + [14], [1] * 7 + [7]).sum(axis=1)
    per_label, shared = fit_weights(y, p, sw), fit_weights(y, p, sw, shared=True)
    assert (per_label[:4, 0] >= 0.9).all() and (per_label[4:, 1] >= 0.9).all()
    assert np.allclose(shared, shared[0]) and 0 < shared[0, 0] < 1
