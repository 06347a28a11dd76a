"""Reading the competition data: DICOM to HU to windowed slices, NIfTI alignment, the npz cache."""
