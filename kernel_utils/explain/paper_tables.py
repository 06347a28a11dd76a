"""Seed 002's case-level results beside the kit's: its Table 3 (ResNet-50 + BLSTM-128, 7-fold cross-validation on
its own 3,666 real CT scans) and the study form's out-of-fold patient_overall row of the same table."""

from __future__ import annotations

import pandas as pd

from kernel_utils.metric import classification_table

COLUMNS = ["sensitivity", "specificity", "ppv", "npv", "f1", "accuracy", "mcc", "auc"]

# Table 3 of seed 002, ResNet-50 + BLSTM-128, in percent: imbalanced (104 positive, 419 negative cases) and balanced
SEED_002_CASE_LEVEL = {
    "as is": (62.28, 80.84, 44.83, 89.62, 52.06, 77.15, 38.54, 71.56),
    "balanced": (62.28, 79.84, 75.55, 68.06, 68.17, 71.06, 42.86, 71.06),
}


def seed002_case_table(labels: pd.DataFrame, oof: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Rows (source, data) x COLUMNS as fractions: the paper's case-level figures and the kit's patient_overall,
    as is and balanced (`classification_table`). labels, oof: wide tables with StudyInstanceUID."""
    rows = {("seed 002 (paper, real data)", data): [v / 100 for v in values]
            for data, values in SEED_002_CASE_LEVEL.items()}
    for data, balanced in (("as is", False), ("balanced", True)):
        table = classification_table(labels, oof, threshold, balanced=balanced)
        rows[("kit, study form (out of fold)", data)] = table.loc["patient_overall", COLUMNS].astype(float).tolist()
    return pd.DataFrame(rows, index=COLUMNS).T
