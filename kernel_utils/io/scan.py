"""What is in a data folder, and what the preprocessing made of it: the tables of notebook 01."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd


def scan_dataset(data_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per split: studies with images, .dcm files, studies named by the CSV, segmentations."""
    data_dir = Path(data_dir)
    rows = []
    for split, csv in (("train", "train.csv"), ("test", "test.csv")):
        folder = data_dir / f"{split}_images"
        studies = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        table = pd.read_csv(data_dir / csv) if (data_dir / csv).exists() else pd.DataFrame()
        named = set(table.get("StudyInstanceUID", pd.Series(dtype=str)))
        present = {p.name for p in studies}
        rows.append({"split": split, "studies_with_images": len(studies),
                     "dcm_files": sum(len(list(p.glob("*.dcm"))) for p in studies),
                     "csv_rows": len(table), "csv_studies": len(named),
                     "csv_studies_without_images": len(named - present),
                     "segmentations": len(list((data_dir / "segmentations").glob("*.nii")))
                     if split == "train" else 0})
    return pd.DataFrame(rows).set_index("split")


def summarize_build(summary: pd.DataFrame, seconds: float | None = None) -> pd.DataFrame:
    """Per split: studies, slices, files, transfer syntaxes, reversed, duplicated series, failures, throughput."""
    out = []
    for split, df in summary.groupby("split"):
        ok = df[df.status != "failed"]
        row = {"split": split, "studies": len(df), "built": int((df.status == "built").sum()),
               "cached": int((df.status == "cached").sum()), "failed": int((df.status == "failed").sum()),
               "slices": int(ok.n_slices.sum()), "files": int(ok.n_files.sum()),
               "reversed": int(ok.reversed.astype(bool).sum()),
               "duplicated_series": int((ok.duplicates_dropped > 0).sum()),
               "with_mask": int(ok.has_mask.astype(bool).sum()),
               "unreadable_files_dropped": int(ok.get("unreadable", pd.Series(0)).fillna(0).sum()),
               "stray_files_ignored": int(ok.get("ignored", pd.Series(0)).fillna(0).sum())}
        for syntax, count in ok.transfer_syntax.value_counts().items():
            row[f"syntax {syntax}"] = int(count)
        built = df[df.status == "built"]
        if len(built):
            row["files/s per worker"] = round(float(built.n_files.sum() / built.seconds.sum()), 1)
        out.append(row)
    return pd.DataFrame(out).set_index("split").fillna(0)


def failures(summary: pd.DataFrame) -> pd.DataFrame:
    """The studies that could not be preprocessed, and why."""
    cols = ["split", "StudyInstanceUID", "error"]
    if "error" not in summary:
        return pd.DataFrame(columns=cols)
    return summary.loc[summary.status == "failed", cols].reset_index(drop=True)


def kept_with_warnings(summary: pd.DataFrame) -> pd.DataFrame:
    """The studies that were cached in spite of a problem (a file dropped, a stray file, a mask not used), and what
    the loader said about them."""
    cols = ["split", "StudyInstanceUID", "warnings"]
    if "warnings" not in summary:
        return pd.DataFrame(columns=cols)
    kept = summary[(summary.status != "failed") & summary.warnings.fillna("").astype(str).str.len().gt(0)]
    return kept[cols].reset_index(drop=True)


def boxes_by_slice(boxes: pd.DataFrame, uid: str, slice_numbers: np.ndarray) -> dict[int, list[tuple]]:
    """train_bounding_boxes.csv rows of one study keyed by head-first slice index: {k: [(x, y, w, h), ...]}."""
    index = {int(n): k for k, n in enumerate(slice_numbers)}
    out: dict[int, list[tuple]] = {}
    for r in boxes[boxes.StudyInstanceUID == uid].itertuples():
        if int(r.slice_number) in index:
            out.setdefault(index[int(r.slice_number)], []).append((r.x, r.y, r.width, r.height))
    return out
