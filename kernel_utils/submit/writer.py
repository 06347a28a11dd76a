"""submission.csv from per-study predictions: exactly test.csv's row ids, in its order, clipped, no NaN.

A study that test.csv asks for but that has no prediction (no images, unreadable) gets the fallback
(the training prior) and a logged warning, never a missing row.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from kernel_utils.metric import TARGETS

log = logging.getLogger(__name__)
CLIP = (1e-4, 1 - 1e-4)


class SubmissionError(ValueError):
    """A submission file that Kaggle would reject or score badly; the message lists every problem."""


def write_submission(predictions: pd.DataFrame, test_csv: str | os.PathLike, out_path: str | os.PathLike,
                     fallback: dict[str, float] | None = None, clip: tuple[float, float] = CLIP) -> pd.DataFrame:
    """Write submission.csv with one row per row_id of test.csv.

    Args:
        predictions: wide per-study table (StudyInstanceUID, C1..C7, patient_overall); may cover more studies.
        test_csv: the competition's test.csv (row_id, StudyInstanceUID, prediction_type).
        out_path: where to write (atomically).
        fallback: probability per target for studies without a prediction; without it they are an error.
        clip: probabilities are clipped into this range.

    Returns:
        The written table (row_id, fractured), plus the list of fallback studies in `.attrs["fallback"]`.
    """
    test = pd.read_csv(test_csv)
    pred = predictions.drop_duplicates("StudyInstanceUID").set_index("StudyInstanceUID")
    per_row = pred[[t for t in TARGETS if t in pred.columns]].astype(float).stack(future_stack=True)
    wanted = pd.MultiIndex.from_arrays([test.StudyInstanceUID, test.prediction_type])
    values = np.array(per_row.reindex(wanted), dtype=float)
    missing = np.isnan(values)
    fallback_studies = sorted(set(test.StudyInstanceUID[missing]))
    if fallback_studies:
        if fallback is None:
            raise SubmissionError(f"no prediction for {len(fallback_studies)} studies of {test_csv}, "
                                  f"e.g. {fallback_studies[:3]}, and no fallback given")
        log.warning("%d of %d test studies have no prediction; using the training prior for them: %s",
                    len(fallback_studies), test.StudyInstanceUID.nunique(), fallback_studies[:5])
        values[missing] = [fallback[t] for t in test.prediction_type[missing]]
    out = pd.DataFrame({"row_id": test.row_id, "fractured": np.clip(values, *clip)})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    out.to_csv(tmp, index=False)
    os.replace(tmp, out_path)
    validate_submission(out_path, test_csv)
    out.attrs["fallback"] = fallback_studies
    return out


def submission_problems(path: str | os.PathLike, test_csv: str | os.PathLike) -> list[str]:
    """Everything wrong with a submission file, as readable sentences (empty when it is valid)."""
    test = pd.read_csv(test_csv)
    try:
        sub = pd.read_csv(path)
    except Exception as e:
        return [f"{path}: cannot be read as CSV: {e}"]
    problems = []
    if list(sub.columns) != ["row_id", "fractured"]:
        problems.append(f"header is {list(sub.columns)}, expected ['row_id', 'fractured']")
        if "row_id" not in sub or "fractured" not in sub:
            return problems
    dup = sub.row_id[sub.row_id.duplicated()].unique().tolist()
    if dup:
        problems.append(f"{len(dup)} duplicate row_id, e.g. {dup[:3]}")
    missing = sorted(set(test.row_id) - set(sub.row_id))
    if missing:
        problems.append(f"{len(missing)} row_id of test.csv missing, e.g. {missing[:3]}")
    extra = sorted(set(sub.row_id) - set(test.row_id))
    if extra:
        problems.append(f"{len(extra)} row_id not in test.csv, e.g. {extra[:3]}")
    values = pd.to_numeric(sub.fractured, errors="coerce")
    bad_text = sub.row_id[values.isna() & sub.fractured.notna()].tolist()
    if bad_text:
        problems.append(f"{len(bad_text)} non-numeric fractured values, e.g. rows {bad_text[:3]}")
    nan = sub.row_id[sub.fractured.isna()].tolist()
    if nan:
        problems.append(f"{len(nan)} NaN fractured values, e.g. rows {nan[:3]}")
    out_of_range = sub.row_id[(values < 0) | (values > 1)].tolist()
    if out_of_range:
        problems.append(f"{len(out_of_range)} fractured values outside [0, 1], e.g. rows {out_of_range[:3]}")
    suffixes = sub.row_id.str.split("_", n=1).str[1]
    unknown = sorted(set(suffixes.dropna()) - set(TARGETS))
    if unknown:
        problems.append(f"row_id suffixes not in {TARGETS}: {unknown[:3]}")
    return problems


def validate_submission(path: str | os.PathLike, test_csv: str | os.PathLike) -> None:
    """Raise SubmissionError listing every problem of the file; return quietly when it is valid."""
    problems = submission_problems(path, test_csv)
    if problems:
        raise SubmissionError(f"{path} is not a valid submission for {test_csv}:\n- " + "\n- ".join(problems))
