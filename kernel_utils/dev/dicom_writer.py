"""Write CT slices as competition-like DICOM files (Explicit/Implicit VR Little Endian, JPEG Lossless SV1).

pydicom writes the uncompressed files; pydicom cannot encode JPEG Lossless, so gdcm re-encodes those.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.1"  # pydicom's root, as in many public kits
ENCODINGS = {
    # name: (transfer syntax, signed, bits stored, rescale intercept, raw value outside the field of view)
    "explicit_int16": (ExplicitVRLittleEndian, True, 16, -1024.0, -2000),
    "implicit_int16": (ImplicitVRLittleEndian, True, 16, -1024.0, -2000),
    "explicit_int16_intercept0": (ExplicitVRLittleEndian, True, 16, 0.0, -3024),
    "jpeg_lossless_uint12": (JPEGLosslessSV1, False, 12, -1024.0, 0),
}


@dataclass(frozen=True)
class SeriesGeometry:
    """Geometry shared by every slice of a series: first-pixel x/y, pixel spacing (row, col), thickness."""

    x0: float
    y0: float
    row_spacing: float
    col_spacing: float
    thickness: float


def hu_to_stored(hu: np.ndarray, encoding: str, outside_fov: np.ndarray | None = None) -> np.ndarray:
    """HU float [.., H, W] -> the stored integer pixel values of `encoding` (int16 or uint16)."""
    _, signed, bits, intercept, pad = ENCODINGS[encoding]
    hu = np.clip(np.rint(hu), -1024, 3071)
    raw = hu - intercept
    raw = raw.astype(np.int16) if signed else np.clip(raw, 0, 2**bits - 1).astype(np.uint16)
    if outside_fov is not None:
        raw[..., outside_fov] = pad
    return raw


def stored_to_hu(raw: np.ndarray, encoding: str) -> np.ndarray:
    """The HU a correct reader must return for stored values `raw` (int16)."""
    intercept = ENCODINGS[encoding][3]
    return (raw.astype(np.int32) + int(intercept)).astype(np.int16)


def _dataset(uid: str, instance: int, z: float, geom: SeriesGeometry, raw: np.ndarray, encoding: str) -> Dataset:
    syntax, signed, bits, intercept, _ = ENCODINGS[encoding]
    sop = f"{uid}.1.{instance}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == JPEGLosslessSV1 else syntax
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyDate = ds.ContentDate = "20220727"  # fixed, so gdcm adds no "now" and a seed gives the same bytes
    ds.StudyTime = ds.ContentTime = "120000"
    ds.Modality = "CT"
    number = uid.rsplit(".", 1)[-1]
    ds.PatientName = number
    ds.PatientID = number
    ds.SliceThickness = f"{geom.thickness:.6f}"
    ds.StudyInstanceUID = uid
    ds.SeriesInstanceUID = f"{uid}.1"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{geom.x0:.6f}", f"{geom.y0:.6f}", f"{z:.6f}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = raw.shape
    ds.PixelSpacing = [f"{geom.row_spacing:.6f}", f"{geom.col_spacing:.6f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.WindowCenter = "500"
    ds.WindowWidth = "2000"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(raw).tobytes()
    return ds


def _compress_jpeg_lossless(path: str) -> None:
    """Re-encode an uncompressed file in place as JPEG Lossless SV1 with gdcm (atomically)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(path)
    if not reader.Read():
        raise RuntimeError(f"{path}: gdcm could not read the file it should compress")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"{path}: gdcm could not encode JPEG Lossless")
    writer = gdcm.ImageWriter()
    tmp = path + ".tmp"
    writer.SetFileName(tmp)
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"{path}: gdcm could not write the compressed file")
    os.replace(tmp, path)


def write_ct_slice(path: str, uid: str, instance: int, z: float, geom: SeriesGeometry, raw: np.ndarray,
                   encoding: str) -> None:
    """Write one CT Image Storage file of stored values raw [H, W] at height z."""
    ds = _dataset(uid, instance, z, geom, raw, encoding)
    ds.save_as(path, enforce_file_format=True)
    if ENCODINGS[encoding][0] == JPEGLosslessSV1:
        _compress_jpeg_lossless(path)
