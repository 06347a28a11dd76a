"""What the end of `make run` prints: each model against the prior out of fold, what the submission is made of, its
loss on the synthetic hidden test labels, and the seconds of every notebook; also `WORK_DIR/run_summary.json`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from kernel_utils.blend.ensemble import CALIBRATED, load_predictions, row_label
from kernel_utils.blend.prior import fit_prior, predict_constant
from kernel_utils.layout import WorkLayout, read_json, write_json
from kernel_utils.metric import TARGETS, VERTEBRAE, auc_or_nan, competition_loss, long_to_wide


def ranking_scores(labels: pd.DataFrame, predictions: pd.DataFrame) -> dict[str, float]:
    """Mean vertebra AUC (C1-C7, labels with both classes) and patient AUC of wide predictions."""
    merged = labels.merge(predictions, on="StudyInstanceUID", suffixes=("", "_p"))
    aucs = {t: auc_or_nan(merged[t].to_numpy(), merged[f"{t}_p"].to_numpy(float)) for t in TARGETS}
    vertebrae = [aucs[t] for t in VERTEBRAE if not np.isnan(aucs[t])]
    return {"mean_vertebra_auc": float(np.mean(vertebrae)) if vertebrae else float("nan"),
            "patient_auc": aucs["patient_overall"]}


def run_summary(data_dir: str | os.PathLike, work_dir: str | os.PathLike,
                notebook_seconds: dict[str, float] | None = None) -> dict:
    """The figures of a finished run, from what notebooks 03-05 wrote under `work_dir`.

    Returns:
        models: name -> OOF loss (per-study normalisation), its ratio to the prior's, mean vertebra and patient AUC;
        submission: the chosen row, whether calibrated, its OOF loss and ratio; hidden_test: the submission's and
        the prior's loss on `_truth/test_labels.csv` (synthetic data only); notebook_seconds.
    """
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    labels = pd.read_csv(data_dir / "train.csv")
    layout = WorkLayout(work_dir)
    table = pd.read_csv(layout.ensemble_table, index_col="model")
    meta = read_json(layout.ensemble_meta)
    prior_loss = float(table.loss_study["prior"])
    models = {}
    for name, (oof, _) in load_predictions(work_dir).items():
        if name in table.index:
            models[name] = {"oof_loss": float(table.loss_study[name]),
                            "over_prior": float(table.loss_study[name]) / prior_loss, **ranking_scores(labels, oof)}
    models["prior"] = {"oof_loss": prior_loss, "over_prior": 1.0, "mean_vertebra_auc": float("nan"),
                       "patient_auc": float("nan")}
    calibrated = meta.get("calibration") is not None
    row = meta["choice"] + CALIBRATED if calibrated else meta["choice"]
    submitted = float(table.loss_study[row]) if row in table.index else float("nan")
    summary = {"models": models,
               "submission": {"from": meta["choice"], "label": row_label(meta["choice"]), "calibrated": calibrated,
                              "oof_loss": submitted,
                              "over_prior": submitted / prior_loss},
               "hidden_test": _hidden_test(data_dir, work_dir, labels),
               "notebook_seconds": dict(notebook_seconds or {})}
    write_json(layout.run_summary, summary)
    return summary


def _hidden_test(data_dir: Path, work_dir: Path, labels: pd.DataFrame) -> dict | None:
    truth_path, submission_path = data_dir / "_truth" / "test_labels.csv", WorkLayout(work_dir).submission
    if not truth_path.exists() or not submission_path.exists():
        return None
    wide = long_to_wide(pd.read_csv(submission_path)).dropna()
    truth = pd.read_csv(truth_path)
    truth = truth[truth.StudyInstanceUID.isin(wide.StudyInstanceUID)]
    if not len(truth):
        return None
    loss = competition_loss(truth, wide)
    prior = competition_loss(truth, predict_constant(fit_prior(labels), truth.StudyInstanceUID))
    return {"studies": len(truth), "loss": loss, "prior_loss": prior, "over_prior": loss / prior,
            **ranking_scores(truth, wide)}


def format_summary(summary: dict) -> str:
    """The summary as a few lines a user reads at a glance."""
    def num(value: float, digits: int = 2) -> str:
        return "-" if value is None or np.isnan(value) else f"{value:.{digits}f}"

    lines = [f"{'out of fold':<34}{'loss':>8}{'x prior':>9}{'mean vertebra AUC':>19}{'patient AUC':>13}"]
    for name, m in sorted(summary["models"].items(), key=lambda kv: kv[1]["oof_loss"]):
        lines.append(f"{name:<34}{num(m['oof_loss'], 4):>8}{num(m['over_prior']):>9}"
                     f"{num(m['mean_vertebra_auc']):>19}{num(m['patient_auc']):>13}")
    sub = summary["submission"]
    lines.append(f"submission from: {sub['label']}{', calibrated per label' if sub['calibrated'] else ''} "
                 f"(out of fold {num(sub['oof_loss'], 4)}, {num(sub['over_prior'])}x the prior)")
    hidden = summary["hidden_test"]
    if hidden:
        lines.append(f"hidden test labels ({hidden['studies']} synthetic studies): loss {num(hidden['loss'], 4)}, "
                     f"prior {num(hidden['prior_loss'], 4)} ({num(hidden['over_prior'])}x), mean vertebra AUC "
                     f"{num(hidden['mean_vertebra_auc'])}, patient AUC {num(hidden['patient_auc'])}")
    seconds = summary["notebook_seconds"]
    if seconds:
        lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
                     + f"; {sum(seconds.values()):.0f} in all")
    return "\n".join(lines)
