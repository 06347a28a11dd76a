"""kernel_utils: the shared engine of the RSNA 2022 cervical spine notebooks.

The names below are the kit's public verbs; everything else lives in modules of one concept each.
"""

from kernel_utils.dicom_io import DicomReadError, Study, load_study
from kernel_utils.nifti_align import SegmentationMismatch, load_segmentation
from kernel_utils.windowing import SEED002_WINDOWS, Window, window, window_slices

__all__ = [
    "DicomReadError", "SEED002_WINDOWS", "SegmentationMismatch", "Study", "Window", "load_segmentation",
    "load_study", "window", "window_slices",
]
