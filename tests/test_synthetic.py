"""The synthetic dataset: competition layout, readable bytes, real label statistics, aligned NIfTI, determinism."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import SMOKE_ARGS, dicom_files

from kernel_utils.dev.synthetic import QUIRKS, REAL_RATES, make_dataset, plan_dataset, render_study


def test_csv_schemas_equal_the_real_files(smoke_dir, reference):
    for name in ["train.csv", "train_bounding_boxes.csv", "test.csv", "sample_submission.csv"]:
        ours = pd.read_csv(smoke_dir / name)
        real = pd.read_csv(reference / "competition_csv" / name)
        assert list(ours.columns) == list(real.columns), name
        assert [str(t) for t in ours.dtypes] == [str(t) for t in real.dtypes], name
    train = pd.read_csv(smoke_dir / "train.csv")
    assert train.StudyInstanceUID.str.fullmatch(r"1\.2\.826\.0\.1\.3680043\.\d+").all()
    assert (train.patient_overall == train[[f"C{i}" for i in range(1, 8)]].max(axis=1)).all()


def test_test_csv_has_eight_rows_per_study_in_test_images(smoke_dir):
    test = pd.read_csv(smoke_dir / "test.csv")
    studies = sorted(p.name for p in (smoke_dir / "test_images").iterdir())
    assert sorted(test.StudyInstanceUID.unique()) == studies
    assert (test.groupby("StudyInstanceUID").size() == 8).all()
    assert (test.row_id == test.StudyInstanceUID + "_" + test.prediction_type).all()
    assert set(test.prediction_type) == {*(f"C{i}" for i in range(1, 8)), "patient_overall"}


def test_public_stub_names_studies_that_are_not_there(tmp_path):
    make_dataset(str(tmp_path), n_train=2, n_test=2, size=32, public_test_stub=True, workers=1, progress=False)
    test = pd.read_csv(tmp_path / "test.csv")
    assert len(test) == 3 and (test.prediction_type == "C1").all()
    present = {p.name for p in (tmp_path / "test_images").iterdir()}
    assert not present & set(test.StudyInstanceUID)


def test_every_file_decodes_to_the_written_pixels(smoke_dir):
    specs = plan_dataset(**SMOKE_ARGS)
    syntaxes = set()
    for spec in specs:
        study = render_study(spec)
        files = dicom_files(smoke_dir / f"{spec.split}_images" / spec.uid)
        n = len(study.z)
        assert len(files) == n * (2 if spec.duplicated else 1)
        by_number = {int(s): k for k, s in enumerate(study.slice_numbers)}
        for path in files:
            ds = pydicom.dcmread(path)
            syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
            number = int(path.stem)
            k = by_number[number if number in by_number else number - n]
            assert np.array_equal(ds.pixel_array, study.raw[k]), path
            assert float(ds.ImagePositionPatient[2]) == pytest.approx(study.z[k], abs=1e-4)
            assert ds.StudyInstanceUID == spec.uid and ds.Modality == "CT"
    assert syntaxes == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.70"}


def test_every_quirk_is_present_and_real(smoke_dir):
    truth = pd.read_csv(smoke_dir / "_truth" / "studies.csv")
    assert truth.reversed.any() and truth["duplicated"].any() and (truth.first_slice > 1).any()
    assert (truth.rows > SMOKE_ARGS["size"]).any()
    assert set(truth.encoding) >= {q for q in QUIRKS if "int" in q}
    for row in truth.itertuples():
        files = dicom_files(smoke_dir / f"{row.split}_images" / row.uid)
        z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files[:3]]
        assert (z[1] > z[0]) == bool(row.reversed), row.uid
        assert int(files[0].stem) == row.first_slice
        jpeg = pydicom.dcmread(files[0], stop_before_pixels=True)
        if row.encoding == "jpeg_lossless_uint12":
            assert (jpeg.BitsStored, jpeg.PixelRepresentation) == (12, 0)
        if row.encoding == "explicit_int16_intercept0":
            assert float(jpeg.RescaleIntercept) == 0.0


def test_nifti_in_its_header_orientation_equals_the_truth(smoke_dir):
    truth = pd.read_csv(smoke_dir / "_truth" / "studies.csv")
    segmented = truth[truth.segmented]
    assert len(segmented) >= 2
    for row in segmented.itertuples():
        img = nib.load(smoke_dir / "segmentations" / f"{row.uid}.nii")
        assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
        data = np.asarray(img.dataobj)
        lab = np.load(smoke_dir / "_truth" / f"{row.uid}.npz")
        assert data.shape == (row.cols, row.rows, row.n_slices)
        i, j, k = np.meshgrid(*[np.arange(s) for s in data.shape], indexing="ij")
        world = img.affine @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
        x, y, z = -world[0], -world[1], world[2]  # RAS -> DICOM LPS
        col = np.rint((x - row.x0) / row.pixel_spacing).astype(int)
        r = np.rint((y - row.y0) / row.pixel_spacing).astype(int)
        zi = np.abs(lab["z"][None, :] - z[:, None]).argmin(axis=1)
        assert np.abs(lab["z"][zi] - z).max() < 1e-3
        assert np.array_equal(data.ravel(), lab["labels"][zi, r, col])
        assert set(np.unique(data)) >= {1, 2, 3, 4, 5, 6, 7}


def test_label_statistics_follow_the_real_rates(reference):
    real = pd.read_csv(reference / "competition_csv" / "train.csv")
    specs = plan_dataset(20000, 0, size=64, seed=1)
    ours = np.array([[k in s.fractured for k in range(1, 8)] for s in specs])
    real_rates = real[[f"C{i}" for i in range(1, 8)]].mean().to_numpy()
    assert np.abs(ours.mean(0) - real_rates).max() < 0.015
    assert abs(ours.any(1).mean() - REAL_RATES["positive"]) < 0.015
    assert ours.mean(0).argmax() == 6 and ours.mean(0).argmin() == 2  # C7 most often, C3 least
    assert ours.sum(1).max() <= 6
    assert abs(np.mean([s.reversed for s in specs]) - REAL_RATES["reversed"]) < 0.01


def test_fractures_are_inside_the_labelled_vertebra_and_boxed(smoke_dir):
    truth = pd.read_csv(smoke_dir / "_truth" / "studies.csv")
    boxes = pd.read_csv(smoke_dir / "train_bounding_boxes.csv")
    for row in truth.itertuples():
        lab = np.load(smoke_dir / "_truth" / f"{row.uid}.npz")
        fractured = {int(c[1:]) for c in str(row.fractured).split()} if isinstance(row.fractured, str) else set()
        hit = set(np.unique(lab["labels"][lab["fracture"]])) - {0}
        assert hit == fractured, row.uid
        b = boxes[boxes.StudyInstanceUID == row.uid]
        if row.boxed:
            assert set(b.slice_number) == set(lab["slice_numbers"][lab["fracture"].any(axis=(1, 2))])
        else:
            assert b.empty


def test_same_seed_same_bytes(tmp_path):
    def digest(folder):
        h = hashlib.sha256()
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(folder)).encode())
                h.update(p.read_bytes())
        return h.hexdigest()

    args = dict(n_train=3, n_test=1, size=32, seed=5, workers=1, progress=False)
    make_dataset(str(tmp_path / "a"), **args)
    make_dataset(str(tmp_path / "b"), **args)
    make_dataset(str(tmp_path / "c"), **{**args, "seed": 6})
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_a_remade_synthetic_dataset_takes_what_was_made_from_the_old_one_with_it(tmp_path, monkeypatch):
    import dataclasses

    from kernel_utils.config import get_profile
    from kernel_utils.dev import pipeline
    from kernel_utils.layout import WorkLayout

    small = dataclasses.replace(get_profile("smoke"), synthetic_train=2, synthetic_test=1, synthetic_size=32)
    monkeypatch.setattr(pipeline, "get_profile", lambda name: small)
    data = pipeline.ensure_synthetic(tmp_path, "smoke")
    layout = WorkLayout(tmp_path)
    stale_entry = layout.cache / "key" / "1.2.3.npz"
    stale_entry.parent.mkdir(parents=True)
    stale_entry.write_bytes(b"from the old dataset")
    layout.preprocess_summary.write_text("old")
    assert pipeline.ensure_synthetic(tmp_path, "smoke") == data and stale_entry.exists()  # the same: kept

    monkeypatch.setattr(pipeline, "get_profile", lambda name: dataclasses.replace(small, synthetic_difficulty=0.1))
    pipeline.ensure_synthetic(tmp_path, "smoke")
    assert json.loads((data / "_truth" / "dataset.json").read_text())["difficulty"] == 0.1
    assert not layout.cache.exists() and not layout.preprocess_summary.exists()
