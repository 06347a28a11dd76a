"""Which test studies can be predicted, and per-study predictions with a logged fallback for the rest."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from kernel_utils.layout import WorkLayout
from kernel_utils.metric import TARGETS

log = logging.getLogger(__name__)


def list_test_studies(data_dir: str | os.PathLike, work_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Every study named by test.csv or present in test_images/, and whether it can be predicted.

    Columns: StudyInstanceUID, in_test_csv, has_images, preprocess_status (from 01's preprocess_summary.csv
    when present: built, cached or failed), error, predictable.
    """
    data_dir = Path(data_dir)
    named = pd.read_csv(data_dir / "test.csv").StudyInstanceUID.unique().tolist()
    folder = data_dir / "test_images"
    present = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    uids = list(dict.fromkeys(named + present))
    table = pd.DataFrame({"StudyInstanceUID": uids, "in_test_csv": [u in set(named) for u in uids],
                          "has_images": [u in set(present) for u in uids]})
    summary_path = WorkLayout(work_dir).preprocess_summary if work_dir else None
    if summary_path is not None and summary_path.exists():
        summary = pd.read_csv(summary_path)
        summary = summary[summary.split == "test"].set_index("StudyInstanceUID")
        table["preprocess_status"] = table.StudyInstanceUID.map(summary.status)
        table["error"] = table.StudyInstanceUID.map(summary.get("error", pd.Series(dtype=str)))
    else:
        table["preprocess_status"], table["error"] = None, None
    table["predictable"] = table.has_images & (table.preprocess_status != "failed")
    return table


def predict_studies(uids: list[str], predict_one: Callable[[str], dict[str, float]]) -> pd.DataFrame:
    """Wide predictions of the studies `predict_one` can handle; a study that raises is logged and left out,
    so the submission writer gives it the fallback."""
    rows = []
    for uid in uids:
        try:
            probs = predict_one(uid)
            rows.append({"StudyInstanceUID": uid, **{t: float(probs[t]) for t in TARGETS}})
        except Exception as e:  # the competition still needs this study's rows: the writer falls back
            log.warning("%s: prediction failed (%s: %s); the prior will be used", uid, type(e).__name__, e)
    return pd.DataFrame(rows, columns=["StudyInstanceUID", *TARGETS])
