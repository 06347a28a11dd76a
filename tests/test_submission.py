"""The submission writer and validator: public stub, hidden-test shape, missing and unreadable studies."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from kernel_utils.blend.prior import predict_constant
from kernel_utils.io.cache import CacheSpec
from kernel_utils.io.cache_build import build_cache
from kernel_utils.metric import TARGETS
from kernel_utils.submit.test_studies import list_test_studies, predict_studies
from kernel_utils.submit.writer import (
    SubmissionError,
    submission_problems,
    validate_submission,
    write_submission,
)

PRIOR = dict(zip(TARGETS, [0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.19, 0.48], strict=True))


def _test_csv(tmp_path, uids, stub=False):
    rows = [(f"{u}_C1", u, "C1") for u in uids] if stub else [(f"{u}_{t}", u, t) for u in uids for t in TARGETS]
    path = tmp_path / "test.csv"
    pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"]).to_csv(path, index=False)
    return path


def test_hidden_test_shape_in_order_and_clipped(tmp_path):
    uids = [f"1.2.826.0.1.3680043.{n}" for n in (5, 3, 9)]
    test_csv = _test_csv(tmp_path, uids)
    preds = predict_constant(dict.fromkeys(TARGETS, 0.0), uids[::-1])
    preds.loc[1, "C3"] = 1.0
    out = write_submission(preds, test_csv, tmp_path / "submission.csv")
    written = pd.read_csv(tmp_path / "submission.csv")
    assert list(written.row_id) == list(pd.read_csv(test_csv).row_id)
    assert written.fractured.min() == pytest.approx(1e-4) and written.fractured.max() == pytest.approx(1 - 1e-4)
    assert written.set_index("row_id").loc[f"{uids[1]}_C3", "fractured"] == pytest.approx(1 - 1e-4)
    assert out.attrs["fallback"] == []


def test_public_stub_gets_exactly_its_rows_from_the_prior(tmp_path, caplog):
    stub = _test_csv(tmp_path, ["1.2.826.0.1.3680043.10197", "1.2.826.0.1.3680043.10454"], stub=True)
    found = predict_constant(dict.fromkeys(TARGETS, 0.3), ["1.2.826.0.1.3680043.777"])  # the dev-run study
    with caplog.at_level(logging.WARNING):
        out = write_submission(found, stub, tmp_path / "submission.csv", fallback=PRIOR)
    assert len(out) == 2 and list(out.fractured) == [PRIOR["C1"]] * 2
    assert "training prior" in caplog.text
    with pytest.raises(SubmissionError, match="no fallback"):
        write_submission(found, stub, tmp_path / "other.csv")


def test_missing_folder_and_unreadable_study_fall_back(smoke_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(smoke_dir, data, ignore=shutil.ignore_patterns("train_images", "segmentations"))
    uids = sorted(p.name for p in (data / "test_images").iterdir())
    shutil.rmtree(data / "test_images" / uids[0])  # a study test.csv names, without images
    for f in (data / "test_images" / uids[1]).glob("*.dcm"):  # a study that cannot be read
        f.write_bytes(b"not a dicom file")
    work = tmp_path / "work"
    summary = build_cache(data, work, "test", CacheSpec(image_size=32), workers=1, progress=False)
    summary.assign(split="test").to_csv(work / "preprocess_summary.csv", index=False)
    studies = list_test_studies(data, work).set_index("StudyInstanceUID")
    assert not studies.loc[uids[0], "has_images"] and studies.loc[uids[1], "preprocess_status"] == "failed"
    assert "not a dicom file" in str(studies.loc[uids[1], "error"]) or "Error" in str(studies.loc[uids[1], "error"])
    predictable = studies.index[studies.predictable].tolist()
    assert sorted(predictable) == sorted(uids[2:])
    preds = predict_studies(predictable + [uids[0]], lambda u: dict.fromkeys(TARGETS, 0.5) if u != uids[0]
                            else (_ for _ in ()).throw(FileNotFoundError(u)))
    out = write_submission(preds, data / "test.csv", work / "submission.csv", fallback=PRIOR)
    assert sorted(out.attrs["fallback"]) == sorted(uids[:2])
    values = out.set_index("row_id").fractured
    assert values[f"{uids[1]}_patient_overall"] == PRIOR["patient_overall"]
    assert values[f"{uids[2]}_C5"] == 0.5
    assert len(out) == 8 * len(uids) and not values.isna().any()


@pytest.mark.parametrize("breakage, message", [
    (lambda s: s.iloc[1:], "missing"),
    (lambda s: s.assign(fractured=s.fractured.where(s.index != 2, np.nan)), "NaN"),
    (lambda s: s.assign(fractured=s.fractured.where(s.index != 3, 1.5)), "outside"),
    (lambda s: pd.concat([s, s.iloc[:1]]), "duplicate"),
    (lambda s: s.rename(columns={"fractured": "prediction"}), "header"),
    (lambda s: s.assign(fractured=s.fractured.astype(object).where(s.index != 4, "high")), "non-numeric"),
])
def test_validator_names_each_problem(tmp_path, breakage, message):
    test_csv = _test_csv(tmp_path, ["1.2.826.0.1.3680043.1", "1.2.826.0.1.3680043.2"])
    good = write_submission(predict_constant(PRIOR, ["1.2.826.0.1.3680043.1", "1.2.826.0.1.3680043.2"]),
                            test_csv, tmp_path / "good.csv")
    assert submission_problems(tmp_path / "good.csv", test_csv) == []
    breakage(good).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SubmissionError, match=message):
        validate_submission(tmp_path / "bad.csv", test_csv)
