"""Segmentation alignment from the NIfTI affine: LAS files, reversed studies, other orientations, mismatches."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from kernel_utils import SegmentationMismatch, load_segmentation, load_study
from kernel_utils.dev.synthetic import StudySpec, render_study, write_study
from kernel_utils.io.nifti_align import align_segmentation


def test_competition_files_align_with_the_truth(smoke_dir):
    truth = pd.read_csv(smoke_dir / "_truth" / "studies.csv")
    for row in truth[truth.segmented].itertuples():
        study = load_study(smoke_dir / "train_images" / row.uid)
        labels = load_segmentation(smoke_dir / "segmentations" / f"{row.uid}.nii", study)
        expected = np.load(smoke_dir / "_truth" / f"{row.uid}.npz")["labels"]
        assert labels.dtype == np.uint8 and np.array_equal(labels, expected)


@pytest.fixture(scope="module")
def reversed_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("reversed")
    spec = StudySpec(uid="1.2.826.0.1.3680043.4242", split="train", seed=(1, 1), rows=48, cols=40,
                     pixel_spacing=3.5, thickness=8.0, spacing=6.0, encoding="explicit_int16", reversed=True,
                     first_slice=2, segmented=True)
    write_study(spec, str(out))
    return out, spec, render_study(spec).labels


def test_reversed_non_square_study(reversed_study):
    out, spec, expected = reversed_study
    study = load_study(out / "train_images" / spec.uid)
    assert study.reversed and study.slice_numbers[0] == study.slice_numbers.max()
    labels = load_segmentation(out / "segmentations" / f"{spec.uid}.nii", study)
    assert np.array_equal(labels, expected)
    assert set(np.unique(labels)) >= set(range(1, 8))


@pytest.mark.parametrize("axcodes", [("R", "P", "I"), ("S", "L", "A"), ("I", "P", "L")])
def test_any_orientation_with_a_correct_affine(reversed_study, tmp_path, axcodes):
    out, spec, expected = reversed_study
    img = nib.load(out / "segmentations" / f"{spec.uid}.nii")
    data = np.asanyarray(img.dataobj)
    transform = ornt_transform(nib.io_orientation(img.affine), axcodes2ornt(axcodes))
    moved = apply_orientation(data, transform)
    affine = img.affine @ inv_ornt_aff(transform, data.shape)
    path = tmp_path / "moved.nii"
    nib.save(nib.Nifti1Image(moved, affine), path)
    assert nib.aff2axcodes(affine) == axcodes
    study = load_study(out / "train_images" / spec.uid)
    assert np.array_equal(load_segmentation(path, study), expected)


def test_mismatches_are_clear_errors_and_an_offset_origin_is_aligned_by_the_axes(reversed_study, tmp_path):
    out, spec, expected = reversed_study
    study = load_study(out / "train_images" / spec.uid)
    img = nib.load(out / "segmentations" / f"{spec.uid}.nii")
    data = np.asanyarray(img.dataobj)
    nib.save(nib.Nifti1Image(data[:, :, 1:], img.affine), tmp_path / "short.nii")
    with pytest.raises(SegmentationMismatch, match="shape"):
        load_segmentation(tmp_path / "short.nii", study)
    nib.save(nib.Nifti1Image(data[:, 1:, :], img.affine), tmp_path / "narrow.nii")
    with pytest.raises(SegmentationMismatch, match="shape"):
        load_segmentation(tmp_path / "narrow.nii", study)
    shifted = img.affine.copy()
    shifted[2, 3] += 3 * spec.spacing  # three slices off: origin only, voxel sizes and shape agree
    nib.save(nib.Nifti1Image(data, shifted), tmp_path / "shifted.nii")
    labels, note = align_segmentation(tmp_path / "shifted.nii", study)
    assert np.array_equal(labels, expected)
    assert "shifted.nii" in note and "3.00 slices" in note
    assert align_segmentation(out / "segmentations" / f"{spec.uid}.nii", study)[1] == ""
    stretched = img.affine @ np.diag([1.0, 1.0, 1.5, 1.0])  # slices 1.5x further apart than the DICOM's
    nib.save(nib.Nifti1Image(data, stretched), tmp_path / "stretched.nii")
    with pytest.raises(SegmentationMismatch, match="voxel size"):
        load_segmentation(tmp_path / "stretched.nii", study)
    flipped = img.affine @ np.array([[1, 0, 0, 0], [0, -1, 0, data.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(data, flipped), tmp_path / "hard_flip.nii")  # data not flipped with the header
    labels = load_segmentation(tmp_path / "hard_flip.nii", study)
    assert not np.array_equal(labels, load_segmentation(out / "segmentations" / f"{spec.uid}.nii", study))


def test_a_study_with_a_dropped_slice_keeps_its_mask_by_z_position(reversed_study, tmp_path):
    out, spec, expected = reversed_study
    study = load_study(out / "train_images" / spec.uid)
    keep = np.delete(np.arange(study.shape[0]), 3)  # as if one file had been unreadable
    short = dataclasses.replace(study, z=study.z[keep], xy=study.xy[keep], order=study.order[keep],
                                slice_numbers=study.slice_numbers[keep], hu=study.hu[keep])
    labels, note = align_segmentation(out / "segmentations" / f"{spec.uid}.nii", short)
    assert np.array_equal(labels, expected[keep]) and "matched by z position" in note
