"""Align a segmentation NIfTI voxel for voxel with a loaded Study, from the NIfTI affine and the DICOM geometry.

No hard-coded flip: the file's orientation is read from its affine, the array is reoriented to the Study's
axes (head first, rows, columns: axis codes I, P, L), and the reoriented affine should land on the DICOM grid;
where only its origin does not, the array axes are trusted (`align_segmentation`).
"""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from kernel_utils.io.dicom_series import SeriesInfo

log = logging.getLogger(__name__)
STUDY_AXCODES = ("I", "P", "L")  # Study.hu axes: decreasing z, increasing DICOM row (y), increasing column (x)


class SegmentationMismatch(ValueError):
    """A segmentation whose shape or geometry does not match its study; the message says how."""


def reorient_to_study_axes(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a 3D array with RAS `affine` to the Study's axis codes; returns (array, new affine)."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(STUDY_AXCODES))
    out = apply_orientation(data, transform)
    return np.ascontiguousarray(out), affine @ inv_ornt_aff(transform, data.shape)


def load_segmentation(nii_path: str | os.PathLike, study: SeriesInfo, tolerance: float = 0.5) -> np.ndarray:
    """Labels of a segmentation NIfTI aligned with study.hu (`align_segmentation`, its note logged).

    Returns:
        uint8 [Z, H, W], the same grid as study.hu (0 background, 1-7 C1-C7, 8-19 T1-T12).
    """
    labels, note = align_segmentation(nii_path, study, tolerance)
    if note:
        log.warning(note)
    return labels


def segmentation_or_none(nii_path: str | os.PathLike | None, study: SeriesInfo) -> np.ndarray | None:
    """`load_segmentation`, or None when the file is absent or cannot be aligned with the study (logged)."""
    return segmentation_and_note(nii_path, study)[0]


def segmentation_and_note(nii_path: str | os.PathLike | None, study: SeriesInfo) -> tuple[np.ndarray | None, str]:
    """(labels on the study's grid or None, what was logged about them): `align_segmentation` that never raises.
    No file: (None, ""); a mask that does not fit, or a file nibabel cannot read: (None, why), the study's images
    stay usable."""
    if nii_path is None or not os.path.exists(nii_path):
        return None, ""
    try:
        labels, note = align_segmentation(nii_path, study)
    except Exception as e:
        labels, note = None, f"{nii_path}: not used, the study is kept without a mask ({type(e).__name__}: {e})"
    if note:
        log.warning(note)
    return labels, note


def align_segmentation(nii_path: str | os.PathLike, study: SeriesInfo,
                       tolerance: float = 0.5) -> tuple[np.ndarray, str]:
    """Labels of a segmentation NIfTI on the study's grid, and a note ("" when the header agrees).

    The header decides when it lands on the DICOM grid (within `tolerance` voxels). When only its origin is off
    (voxel sizes and shape agree), the array axes are trusted and the origin ignored, as every top team aligned
    the competition's masks, with a note naming the file and the offset. When the NIfTI has other slices than the
    study (a DICOM file dropped as unreadable, a duplicated series) and its header places every study slice, the
    slices are matched by z position.

    Args:
        nii_path: the competition's `segmentations/<uid>.nii` (any axis-aligned orientation the header declares).
        study: the study it belongs to (a loaded Study, or the SeriesInfo of a scan: only geometry is used).
        tolerance: allowed misplacement, in voxels, between the NIfTI grid and the DICOM grid.

    Returns:
        (labels uint8 [Z, H, W] on the grid of study.hu, note).

    Raises:
        SegmentationMismatch: the in-plane shape or the voxel sizes differ, or the slices differ and cannot be
            matched by position.
    """
    img = nib.load(str(nii_path), mmap=False)  # read now: no memory map of the file outlives the call
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise SegmentationMismatch(f"{nii_path}: expected a 3D array, got shape {data.shape}")
    labels, affine = reorient_to_study_axes(data, img.affine)
    if labels.shape[1:] != study.shape[1:]:
        raise SegmentationMismatch(f"{nii_path}: shape {labels.shape} after reorientation to {STUDY_AXCODES}, "
                                   f"study {study.uid} has {study.shape} (slices, rows, columns)")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # world (LPS) position of each voxel index
    dz, dy, dx = study.spacing
    n = labels.shape[0]
    size_error = {"slice": abs(-lps[2, 0] - dz) * max(n - 1, 1) / dz,
                  "row": abs(lps[1, 1] - dy) * labels.shape[1] / dy,
                  "column": abs(lps[0, 2] - dx) * labels.shape[2] / dx}
    if max(size_error.values()) > tolerance:
        raise SegmentationMismatch(
            f"{nii_path}: voxel size {(-lps[2, 0], lps[1, 1], lps[0, 2])} mm, study {study.uid} has {study.spacing} "
            f"(off by {size_error['slice']:.2f} slices, {size_error['row']:.2f} rows, {size_error['column']:.2f} "
            f"columns over the volume; tolerance {tolerance} voxels)")
    nifti_z = lps[2, 0] * np.arange(n) + lps[2, 3]
    off_y = abs(lps[1, 3] - study.xy[0, 1]) / dy
    off_x = abs(lps[0, 3] - study.xy[0, 0]) / dx
    if n != study.shape[0]:
        nearest = np.abs(study.z[:, None] - nifti_z[None, :]).argmin(axis=1)
        off_z = np.abs(nifti_z[nearest] - study.z).max() / dz
        if max(off_z, off_y, off_x) > tolerance or len(set(nearest.tolist())) != len(nearest):
            raise SegmentationMismatch(
                f"{nii_path}: shape {labels.shape} after reorientation, study {study.uid} has {study.shape}, and "
                f"the header does not place every study slice (off by up to {off_z:.2f} slices, {off_y:.2f} rows, "
                f"{off_x:.2f} columns)")
        note = f"{nii_path}: {n} slices for the study's {study.shape[0]}; matched by z position"
        return _as_labels(labels[nearest]), note
    off_z = np.abs(nifti_z - study.z).max() / dz
    if max(off_z, off_y, off_x) <= tolerance:
        return _as_labels(labels), ""
    note = (f"{nii_path}: header origin off by {off_z:.2f} slices, {off_y:.2f} rows, {off_x:.2f} columns from "
            f"study {study.uid}; aligned by the array axes ({''.join(nib.aff2axcodes(img.affine))}), origin ignored")
    return _as_labels(labels), note


def _as_labels(labels: np.ndarray) -> np.ndarray:
    if np.issubdtype(labels.dtype, np.floating):
        labels = np.rint(labels)
    return labels.astype(np.uint8)
