"""kernel_utils: the shared engine of the RSNA 2022 cervical spine notebooks.

The names below are the kit's public verbs; everything else lives in modules of one concept each.
"""

from kernel_utils.io.dicom_io import load_study
from kernel_utils.io.dicom_series import DicomReadError, Study
from kernel_utils.io.nifti_align import SegmentationMismatch, load_segmentation
from kernel_utils.io.windowing import SEED002_WINDOWS, Window, window, window_slices
from kernel_utils.metric import classification_table, competition_loss, long_to_wide, wide_to_long
from kernel_utils.submit.writer import SubmissionError, validate_submission, write_submission

__all__ = [
    "DicomReadError", "SEED002_WINDOWS", "SegmentationMismatch", "Study", "SubmissionError", "Window",
    "classification_table", "competition_loss", "load_segmentation", "load_study", "long_to_wide",
    "validate_submission", "wide_to_long", "window", "window_slices", "write_submission",
]
