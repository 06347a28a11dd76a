"""Read one competition study: DICOM files -> HU int16 [Z, H, W], head first, duplicates dropped.

Files are sorted by ImagePositionPatient (never by file name). dicomsdl reads headers and pixels (every
transfer syntax of the competition) about 4x faster than pydicom, straight into the output volume. Without
it, or for a file it cannot read, pydicom parses the header, native pixels are read straight into the volume
and JPEG Lossless frames go to imagecodecs, then to pydicom's own decoders (gdcm, pylibjpeg): a missing
optional decoder never stops a kernel.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import generate_frames

log = logging.getLogger(__name__)

DECODERS = ("auto", "dicomsdl", "imagecodecs", "pydicom")
Z_DUPLICATE_TOLERANCE_MM = 1e-3


class DicomReadError(RuntimeError):
    """A DICOM file that cannot be read or decoded; the message names the file and the reason."""


@dataclass
class Study:
    """One CT study, head first.

    Attributes:
        uid: StudyInstanceUID read from the files.
        hu: int16 [Z, H, W] Hounsfield units, patient z decreasing along axis 0.
        z: float64 [Z] ImagePositionPatient z of every slice.
        xy: float64 [Z, 2] ImagePositionPatient x, y (first pixel centre) of every slice.
        spacing: (dz, dy, dx) in mm; dz is the median step between kept slices.
        slice_numbers: int64 [Z] the file slice number (file name) of every kept slice.
        path: the study folder.
        transfer_syntax: the transfer syntax UID of the files.
        n_files: how many files were read.
        duplicates_dropped: files dropped because their z position was already present.
        reversed: the file order ran feet to head (z increasing with slice number).
        decoder: which decoder produced the pixels.
    """

    uid: str
    hu: np.ndarray
    z: np.ndarray
    xy: np.ndarray
    spacing: tuple[float, float, float]
    slice_numbers: np.ndarray
    path: str = ""
    transfer_syntax: str = ""
    n_files: int = 0
    duplicates_dropped: int = 0
    reversed: bool = False
    decoder: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


def _slice_number(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError as e:
        raise DicomReadError(f"{path}: file name is not a slice number") from e


def list_slices(study_dir: str | os.PathLike) -> list[Path]:
    """The .dcm files of a study folder, in slice-number order (the order is only a tie-break)."""
    folder = Path(study_dir)
    if not folder.is_dir():
        raise DicomReadError(f"{folder}: study folder not found")
    files = sorted(folder.glob("*.dcm"), key=_slice_number)
    if not files:
        raise DicomReadError(f"{folder}: no .dcm files")
    return files


def _imagecodecs():
    try:
        import imagecodecs

        return imagecodecs
    except ImportError:  # optional: fall back to pydicom's decoders
        return None


def _read_uncompressed(f, ds, out: np.ndarray, path: Path) -> None:
    """Read the native pixel data element that follows the header straight into out [H, W]."""
    implicit = ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    head = f.read(8 if implicit else 12)
    group, elem = struct.unpack("<HH", head[:4])
    if (group, elem) != (0x7FE0, 0x0010):
        raise DicomReadError(f"{path}: expected Pixel Data after the header, found ({group:04X},{elem:04X})")
    length = struct.unpack("<I", head[4:8] if implicit else head[8:12])[0]
    if length < out.nbytes:
        raise DicomReadError(f"{path}: Pixel Data holds {length} bytes, {out.nbytes} expected")
    if f.readinto(memoryview(out).cast("B")) != out.nbytes:
        raise DicomReadError(f"{path}: file truncated inside Pixel Data")


def _decode_compressed(f, path: Path, decoder: str) -> tuple[np.ndarray, str]:
    """Decode a compressed frame with imagecodecs when possible, else with pydicom (gdcm, pylibjpeg)."""
    f.seek(0)
    ds = pydicom.dcmread(f)
    codecs = _imagecodecs() if decoder in ("auto", "imagecodecs") else None
    if codecs is not None and ds.file_meta.TransferSyntaxUID in (pydicom.uid.JPEGLosslessSV1, pydicom.uid.JPEGLossless):
        try:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            return np.asarray(codecs.jpeg8_decode(frame)), "imagecodecs"
        except Exception as e:  # a codec that cannot read this frame: the fallback can
            if decoder == "imagecodecs":
                raise DicomReadError(f"{path}: imagecodecs could not decode: {e}") from e
            log.debug("%s: imagecodecs failed (%s); using pydicom", path, e)
    try:
        return ds.pixel_array, "pydicom"
    except Exception as e:
        raise DicomReadError(f"{path}: cannot decode {ds.file_meta.TransferSyntaxUID.name}: {e}") from e


def _to_hu(raw: np.ndarray, signed: bool, bits: int, slope: float, intercept: float) -> np.ndarray:
    """Stored values (as read, 16-bit) -> HU int16, honouring BitsStored and PixelRepresentation."""
    v = raw.view(np.int16) if raw.dtype == np.int16 else raw.view(np.uint16)
    if bits < 16:
        if signed:
            shift = 16 - bits
            v = (v.view(np.int16) << shift) >> shift
        else:
            v = v & ((1 << bits) - 1)
    if slope == 1.0 and float(intercept).is_integer():
        lo, hi = int(v.min()), int(v.max())
        if -32768 <= lo + intercept and hi + intercept <= 32767 and (signed or bits < 16 or hi < 32768):
            return np.add(v.view(np.int16), np.int16(intercept), dtype=np.int16)  # exact: no overflow possible
        hu = v.astype(np.int32) + int(intercept)
    else:
        hu = np.rint(v.astype(np.float32) * slope + intercept)
    return np.clip(hu, -32768, 32767).astype(np.int16)


class _Slots:
    """The output volume, allocated once the first file tells its size; every later file must match."""

    def __init__(self, n: int):
        self.n = n
        self.buf: np.ndarray | None = None
        self.pixel_spacing = (1.0, 1.0)
        self.thickness = 1.0
        self.first = ""

    def raw(self, k: int, signed: bool) -> np.ndarray:
        return self.buf[k] if signed else self.buf[k].view(np.uint16)

    def get(self, k: int, rows: int, cols: int, signed: bool, path: Path, spacing, thickness) -> np.ndarray:
        if self.buf is None:
            self.buf = np.empty((self.n, rows, cols), dtype=np.int16)
            self.pixel_spacing = tuple(float(v) for v in spacing) if spacing else (1.0, 1.0)
            self.thickness = float(thickness or 1.0)
            self.first = path.name
        elif (rows, cols) != self.buf.shape[1:]:
            raise DicomReadError(f"{path}: {rows}x{cols} pixels, the study's file {self.first} has "
                                 f"{self.buf.shape[1]}x{self.buf.shape[2]}")
        return self.raw(k, signed)


def _dicomsdl():
    try:
        import dicomsdl

        return dicomsdl
    except ImportError:  # optional: pydicom reads everything, only slower
        return None


def _read_dicomsdl(sdl, path: Path, slots: _Slots, k: int) -> tuple:
    """Header and pixels of one file with dicomsdl (about 4x pydicom's speed), pixels straight into the volume."""
    d = sdl.open(str(path))
    info = d.getPixelDataInfo()
    if info["BitsAllocated"] != 16 or info["SamplesPerPixel"] != 1:
        raise DicomReadError(f"{path}: only 16-bit single-sample CT is supported "
                             f"(BitsAllocated {info['BitsAllocated']}, SamplesPerPixel {info['SamplesPerPixel']})")
    signed = bool(info["PixelRepresentation"])
    slot = slots.get(k, int(info["Rows"]), int(info["Cols"]), signed, path, d.PixelSpacing, d.SliceThickness)
    d.copyFrameData(0, slot)
    slope = info["RescaleSlope"]
    intercept = info["RescaleIntercept"]
    return (d.ImagePositionPatient, str(d.StudyInstanceUID), str(d.TransferSyntaxUID), "dicomsdl", signed,
            int(info["BitsStored"]), 1.0 if slope is None else float(slope),
            0.0 if intercept is None else float(intercept))


def _read_pydicom(path: Path, slots: _Slots, k: int, decoder: str) -> tuple:
    """Header with pydicom; native pixels read straight into the volume, compressed ones decoded."""
    with open(path, "rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        syntax = ds.file_meta.TransferSyntaxUID
        signed = int(ds.PixelRepresentation) == 1
        if int(ds.BitsAllocated) != 16 or int(getattr(ds, "SamplesPerPixel", 1)) != 1:
            raise DicomReadError(f"{path}: only 16-bit single-sample CT is supported "
                                 f"(BitsAllocated {ds.BitsAllocated}, SamplesPerPixel {ds.SamplesPerPixel})")
        rows, cols = int(ds.Rows), int(ds.Columns)
        slot = slots.get(k, rows, cols, signed, path, ds.get("PixelSpacing"), ds.get("SliceThickness"))
        if syntax.is_compressed:
            pixels, used = _decode_compressed(f, path, decoder)
            if pixels.shape != (rows, cols):
                raise DicomReadError(f"{path}: decoded {pixels.shape}, header says {(rows, cols)}")
            slot[...] = pixels.astype(slot.dtype, copy=False)
        else:
            if not syntax.is_little_endian:
                raise DicomReadError(f"{path}: big-endian pixel data is not supported")
            _read_uncompressed(f, ds, slot, path)
            used = "native"
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        return ([float(v) for v in ds.ImagePositionPatient], str(ds.StudyInstanceUID), str(syntax), used, signed,
                int(ds.BitsStored), slope, intercept)


def load_study(study_dir: str | os.PathLike, decoder: str = "auto") -> Study:
    """Load a study folder of DICOM slices as HU, head first.

    Args:
        study_dir: `.../train_images/<StudyInstanceUID>` (files `<slice_number>.dcm`).
        decoder: "auto" (dicomsdl when installed, else pydicom; any file dicomsdl cannot read goes to pydicom),
            "dicomsdl", "imagecodecs" (pydicom headers, imagecodecs for JPEG Lossless) or "pydicom".

    Returns:
        The Study, hu int16 [Z, H, W] ordered by decreasing patient z, duplicate z positions dropped.

    Raises:
        DicomReadError: a file that cannot be read or decoded, or inconsistent slice sizes; names the file.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    files = list_slices(study_dir)
    slots = _Slots(len(files))
    pos = np.empty((len(files), 3))
    uids, syntaxes, decoders = set(), set(), set()
    sdl = _dicomsdl() if decoder in ("auto", "dicomsdl") else None
    if decoder == "dicomsdl" and sdl is None:
        raise DicomReadError("decoder='dicomsdl' asked for, but dicomsdl is not installed")
    for k, path in enumerate(files):
        header = None
        if sdl is not None:
            try:
                header = _read_dicomsdl(sdl, path, slots, k)
            except DicomReadError:
                raise
            except Exception as e:  # dicomsdl cannot read it: pydicom can, or says why not
                if decoder == "dicomsdl":
                    raise DicomReadError(f"{path}: dicomsdl: {type(e).__name__}: {e}") from e
                log.debug("%s: dicomsdl failed (%s); using pydicom", path, e)
        if header is None:
            try:
                header = _read_pydicom(path, slots, k, decoder)
            except DicomReadError:
                raise
            except Exception as e:
                raise DicomReadError(f"{path}: {type(e).__name__}: {e}") from e
        position, uid, syntax, used, signed, bits, slope, intercept = header
        slots.buf[k] = _to_hu(slots.raw(k, signed), signed, bits, slope, intercept)
        pos[k] = position
        uids.add(uid)
        syntaxes.add(syntax)
        decoders.add(used)
    buf = slots.buf
    ds_spacing, ds_thickness = slots.pixel_spacing, slots.thickness
    assert buf is not None
    numbers = np.array([_slice_number(p) for p in files])
    order = np.lexsort((numbers, -pos[:, 2]))  # head first; equal z: lowest slice number first
    z_sorted = pos[order, 2]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = np.abs(np.diff(z_sorted)) > Z_DUPLICATE_TOLERANCE_MM
    order = order[keep]
    folder = Path(study_dir)
    warnings = []
    if len(uids) != 1:
        raise DicomReadError(f"{folder}: files from {len(uids)} studies: {sorted(uids)}")
    uid = uids.pop()
    if uid != folder.name:
        warnings.append(f"{folder}: folder name differs from StudyInstanceUID {uid}")
    dropped = len(files) - len(order)
    if dropped:
        warnings.append(f"{folder}: dropped {dropped} files with duplicate z positions")
    for w in warnings:
        log.warning(w)
    z = pos[order, 2]
    dz = float(np.median(-np.diff(z))) if len(z) > 1 else ds_thickness
    dy, dx = ds_spacing
    if np.array_equal(order, np.arange(len(files))):
        hu = buf
    elif np.array_equal(order, np.arange(len(files))[::-1]):
        hu = buf[::-1]
    else:
        hu = buf[order]
    return Study(uid=uid, hu=hu, z=z, xy=pos[order, :2], spacing=(dz, dy, dx), slice_numbers=numbers[order],
                 path=str(folder), transfer_syntax="/".join(sorted(syntaxes)), n_files=len(files),
                 duplicates_dropped=dropped, reversed=bool(len(files) > 1 and pos[-1, 2] > pos[0, 2]),
                 decoder="/".join(sorted(decoders)), warnings=warnings)
