"""Align a segmentation NIfTI voxel for voxel with a loaded Study, from the NIfTI affine and the DICOM geometry.

No hard-coded flip: the file's orientation is read from its affine, the array is reoriented to the Study's
axes (head first, rows, columns: axis codes I, P, L), and the reoriented affine must land on the DICOM grid.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from kernel_utils.dicom_io import SeriesInfo

STUDY_AXCODES = ("I", "P", "L")  # Study.hu axes: decreasing z, increasing DICOM row (y), increasing column (x)


class SegmentationMismatch(ValueError):
    """A segmentation whose shape or geometry does not match its study; the message says how."""


def reorient_to_study_axes(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a 3D array with RAS `affine` to the Study's axis codes; returns (array, new affine)."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(STUDY_AXCODES))
    out = apply_orientation(data, transform)
    return np.ascontiguousarray(out), affine @ inv_ornt_aff(transform, data.shape)


def load_segmentation(nii_path: str | os.PathLike, study: SeriesInfo, tolerance: float = 0.5) -> np.ndarray:
    """Labels of a segmentation NIfTI aligned with study.hu.

    Args:
        nii_path: the competition's `segmentations/<uid>.nii` (any axis-aligned orientation the header declares).
        study: the study it belongs to (a loaded Study, or the SeriesInfo of a scan: only geometry is used).
        tolerance: allowed misplacement, in voxels, between the NIfTI grid and the DICOM grid.

    Returns:
        uint8 [Z, H, W], the same grid as study.hu (0 background, 1-7 C1-C7, 8-19 T1-T12).

    Raises:
        SegmentationMismatch: the shapes differ after reorientation, or the grids are not the same places.
    """
    img = nib.load(str(nii_path))
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise SegmentationMismatch(f"{nii_path}: expected a 3D array, got shape {data.shape}")
    labels, affine = reorient_to_study_axes(data, img.affine)
    if labels.shape != study.shape:
        raise SegmentationMismatch(f"{nii_path}: shape {labels.shape} after reorientation to {STUDY_AXCODES}, "
                                   f"study {study.uid} has {study.shape} (slices, rows, columns)")
    # World (LPS) position of every study voxel index along each axis, compared with the NIfTI's.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    dz, dy, dx = study.spacing
    k = np.arange(labels.shape[0])
    nifti_z = lps[2, 0] * k + lps[2, 3]
    err_z = np.abs(nifti_z - study.z).max() / max(dz, 1e-6)
    err_y = abs(lps[1, 3] - study.xy[0, 1]) / dy + abs(lps[1, 1] - dy) * labels.shape[1] / dy
    err_x = abs(lps[0, 3] - study.xy[0, 0]) / dx + abs(lps[0, 2] - dx) * labels.shape[2] / dx
    if max(err_z, err_y, err_x) > tolerance:
        raise SegmentationMismatch(
            f"{nii_path}: grid does not match study {study.uid}: off by {err_z:.2f} slices, {err_y:.2f} rows, "
            f"{err_x:.2f} columns (tolerance {tolerance} voxels)")
    if np.issubdtype(labels.dtype, np.floating):
        labels = np.rint(labels)
    return labels.astype(np.uint8)
