"""Read one competition study: DICOM files -> HU int16 [Z, H, W], head first, duplicates dropped.

Files are sorted by ImagePositionPatient (never by file name). dicomsdl reads headers and pixels (every
transfer syntax of the competition) about 4x faster than pydicom; JPEG Lossless frames go from it to
imagecodecs, the fastest decoder here. Without them, or for a file they cannot read, pydicom parses the
header, native pixels are read straight into the slice buffer and compressed frames go to imagecodecs, then to
pydicom's own decoders (gdcm, pylibjpeg): a missing optional decoder never stops a kernel.

`scan_study` reads a study once and hands every slice's stored values to a callback: `load_study` turns them
into an HU volume, the cache windows them as they come (no HU volume at all).

One bad file does not lose a study: a file that cannot be read (cut, no ImagePositionPatient, another size than
the rest of the series) is dropped with a warning naming it, and a stray file not named `<slice number>.dcm`
(a macOS `._1.dcm`) is ignored; the study fails only when fewer than half of its files can be read.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import generate_frames

from kernel_utils.io.dicom_guard import UNDEFINED_LENGTH, checked_pixel_length
from kernel_utils.io.dicom_series import (
    DicomReadError,
    Rescale,
    SeriesInfo,
    SeriesScan,
    SliceHeader,
    Study,
    in_head_first_order,
    list_slices,
    series_info,
)

log = logging.getLogger(__name__)

DECODERS = ("auto", "dicomsdl", "imagecodecs", "pydicom")
class SliceSizeMismatch(DicomReadError):
    """A file whose slice size differs from the series'; `shape` is its (rows, columns)."""

    def __init__(self, message: str, shape: tuple[int, int]):
        super().__init__(message)
        self.shape = shape


class _NotForNativeReader(Exception):
    """A file the native reader must not be given (cut, or less Pixel Data than its size): pydicom reads it."""


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


class _SliceBuffer:
    """One reusable int16 [H, W] buffer that every file of a study decodes into; `shape`, or else the first file,
    fixes the size."""

    def __init__(self, shape: tuple[int, int] | None = None):
        self.buf: np.ndarray | None = None if shape is None else np.empty(shape, dtype=np.int16)
        self.first = "the series" if shape else ""

    def get(self, rows: int, cols: int, path: Path) -> np.ndarray:
        if self.buf is None:
            self.buf = np.empty((rows, cols), dtype=np.int16)
            self.first = f"file {path.name}"
        elif (rows, cols) != self.buf.shape:
            raise SliceSizeMismatch(f"{path}: {rows}x{cols} pixels, {self.first} has "
                                    f"{self.buf.shape[0]}x{self.buf.shape[1]}", (rows, cols))
        return self.buf


def _dicomsdl():
    try:
        import dicomsdl

        return dicomsdl
    except ImportError:  # optional: pydicom reads everything, only slower
        return None


def _spacing(value) -> tuple[float, float]:
    return tuple(float(v) for v in value) if value else (1.0, 1.0)  # type: ignore[return-value]


def _read_dicomsdl(sdl, path: Path, buffer: _SliceBuffer, decoder: str) -> SliceHeader:
    """Header and pixels of one file with dicomsdl (about 4x pydicom's speed); JPEG Lossless frames go to
    imagecodecs when it is installed (about 1.4x dicomsdl's own decoder here), pixels straight into the buffer.
    A file that is not whole (`dicom_guard`) never reaches dicomsdl, which would crash the process on it."""
    length = checked_pixel_length(path)
    if length is None:
        raise _NotForNativeReader(f"{path}: Pixel Data not whole (or not found) for dicomsdl")
    d = sdl.open(str(path))
    info = d.getPixelDataInfo()
    if info["BitsAllocated"] != 16 or info["SamplesPerPixel"] != 1:
        raise DicomReadError(f"{path}: only 16-bit single-sample CT is supported "
                             f"(BitsAllocated {info['BitsAllocated']}, SamplesPerPixel {info['SamplesPerPixel']})")
    rows, cols = int(info["Rows"]), int(info["Cols"])
    if length != UNDEFINED_LENGTH and length < 2 * rows * cols:
        raise _NotForNativeReader(f"{path}: Pixel Data holds {length} bytes, {2 * rows * cols} expected")
    signed = bool(info["PixelRepresentation"])
    buf = buffer.get(rows, cols, path)
    # one getValues call: attribute access costs about 10 us a tag through dicomsdl's Python wrapper
    position, uid, syntax, pixel_spacing, thickness = d.getValues(
        ["ImagePositionPatient", "StudyInstanceUID", "TransferSyntaxUID", "PixelSpacing", "SliceThickness"])
    if position is None:
        raise DicomReadError(f"{path}: no ImagePositionPatient")
    syntax = str(syntax)
    used = "dicomsdl"
    codecs = _imagecodecs() if decoder == "auto" and syntax in _JPEG_LOSSLESS else None
    if codecs is not None:
        try:
            frame = d.getDataElement("PixelData").toPixelSequence().encodedFrameData(0)
            codecs.jpeg8_decode(frame, out=buf.view(np.uint16))
            used = "dicomsdl+imagecodecs"
        except Exception as e:  # a frame imagecodecs cannot read: dicomsdl's own decoder can
            log.debug("%s: imagecodecs failed (%s); using dicomsdl", path, e)
    if used == "dicomsdl":
        d.copyFrameData(0, buf if signed else buf.view(np.uint16))
    slope, intercept = info["RescaleSlope"], info["RescaleIntercept"]
    rescale = Rescale(signed, int(info["BitsStored"]),
                      1.0 if slope is None else float(slope), 0.0 if intercept is None else float(intercept))
    return SliceHeader(tuple(position), str(uid), syntax, used, rescale, rows, cols, _spacing(pixel_spacing),
                       float(thickness or 1.0))


def _read_pydicom(path: Path, buffer: _SliceBuffer, decoder: str) -> SliceHeader:
    """Header with pydicom; native pixels read straight into the buffer, compressed ones decoded."""
    with open(path, "rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        syntax = ds.file_meta.TransferSyntaxUID
        if int(ds.BitsAllocated) != 16 or int(getattr(ds, "SamplesPerPixel", 1)) != 1:
            raise DicomReadError(f"{path}: only 16-bit single-sample CT is supported "
                                 f"(BitsAllocated {ds.BitsAllocated}, SamplesPerPixel {ds.SamplesPerPixel})")
        rows, cols = int(ds.Rows), int(ds.Columns)
        out = buffer.get(rows, cols, path)
        if syntax.is_compressed:
            pixels, used = _decode_compressed(f, path, decoder)
            if pixels.shape != (rows, cols):
                raise DicomReadError(f"{path}: decoded {pixels.shape}, header says {(rows, cols)}")
            out.view(pixels.dtype if pixels.dtype.itemsize == 2 else np.uint16)[...] = pixels
        else:
            if not syntax.is_little_endian:
                raise DicomReadError(f"{path}: big-endian pixel data is not supported")
            _read_uncompressed(f, ds, out, path)
            used = "native"
        rescale = Rescale.from_dataset(ds)
        return SliceHeader(tuple(float(v) for v in ds.ImagePositionPatient), str(ds.StudyInstanceUID), str(syntax),
                           used, rescale, rows, cols, _spacing(ds.get("PixelSpacing")),
                           float(ds.get("SliceThickness") or 1.0))


_JPEG_LOSSLESS = (str(pydicom.uid.JPEGLosslessSV1), str(pydicom.uid.JPEGLossless))


def _read_file(path: Path, buffer: _SliceBuffer, sdl, decoder: str) -> SliceHeader:
    """One file into the buffer, dicomsdl first when allowed; any failure is a DicomReadError naming the file."""
    if sdl is not None:
        try:
            return _read_dicomsdl(sdl, path, buffer, decoder)
        except DicomReadError:
            raise
        except Exception as e:  # dicomsdl cannot read it: pydicom can, or says why not
            if decoder == "dicomsdl":
                raise DicomReadError(f"{path}: dicomsdl: {type(e).__name__}: {e}") from e
            log.debug("%s: dicomsdl failed (%s); using pydicom", path, e)
    try:
        return _read_pydicom(path, buffer, decoder)
    except DicomReadError:
        raise
    except Exception as e:
        raise DicomReadError(f"{path}: {type(e).__name__}: {e}") from e


def scan_study(study_dir: str | os.PathLike, on_slice: Callable[[int, np.ndarray, SliceHeader], None],
               decoder: str = "auto", files: list[Path] | None = None,
               on_restart: Callable[[], None] | None = None) -> SeriesInfo:
    """Read every file of a study once, in file order, handing each slice's stored pixels to `on_slice`.

    The loader of this module and the cache's streaming windower are both built on it, so they agree on
    decoders, ordering, duplicates and errors. A file that cannot be read is dropped (named in the warnings);
    when most files have another size than the first one read, the study is read again at their size
    (`on_restart` is called first, so the callback can forget what it allocated).

    Args:
        study_dir: `.../train_images/<StudyInstanceUID>` (files `<slice_number>.dcm`).
        on_slice: called as on_slice(k, raw, header) for the k-th file in slice-number order that could be read;
            raw is the stored 16-bit values [H, W] (int16 or uint16 view as PixelRepresentation says;
            header.rescale turns them into HU), valid only during the call.
        decoder: see `load_study`.
        files: the study's files when already listed.
        on_restart: called before the study is read again.

    Returns:
        The SeriesInfo; its `order` says which files are kept and in what (head-first) order.

    Raises:
        DicomReadError: fewer than MIN_READABLE_SHARE of the files can be read, or they belong to several studies.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    files = list_slices(study_dir) if files is None else files
    sdl = _dicomsdl() if decoder in ("auto", "dicomsdl") else None
    if decoder == "dicomsdl" and sdl is None:
        raise DicomReadError("decoder='dicomsdl' asked for, but dicomsdl is not installed")
    scan = _scan_files(files, on_slice, sdl, decoder, _SliceBuffer())
    if len(scan.other_sizes) > len(scan.kept):  # the first file read was the odd one out
        if on_restart is not None:
            on_restart()
        shape = Counter(scan.other_sizes).most_common(1)[0][0]
        scan = _scan_files(files, on_slice, sdl, decoder, _SliceBuffer(shape))
    return series_info(Path(study_dir), files, scan)


def _scan_files(files: list[Path], on_slice, sdl, decoder: str, buffer: _SliceBuffer) -> SeriesScan:
    scan = SeriesScan()
    for k, path in enumerate(files):
        try:
            header = _read_file(path, buffer, sdl, decoder)
        except DicomReadError as e:
            scan.problems.append(str(e))
            if isinstance(e, SliceSizeMismatch):
                scan.other_sizes.append(e.shape)
            continue
        on_slice(k, buffer.buf if header.rescale.signed else buffer.buf.view(np.uint16), header)
        scan.kept.append(k)
        scan.headers.append(header)
    return scan


def load_study(study_dir: str | os.PathLike, decoder: str = "auto") -> Study:
    """Load a study folder of DICOM slices as HU, head first.

    Args:
        study_dir: `.../train_images/<StudyInstanceUID>` (files `<slice_number>.dcm`).
        decoder: "auto" (dicomsdl when installed, JPEG Lossless frames through imagecodecs when installed, else
            pydicom; any file dicomsdl cannot read goes to pydicom), "dicomsdl" (dicomsdl's own decoders),
            "imagecodecs" (pydicom headers, imagecodecs for JPEG Lossless) or "pydicom".

    Returns:
        The Study, hu int16 [Z, H, W] ordered by decreasing patient z, duplicate z positions dropped.

    Raises:
        DicomReadError: fewer than half of the files can be read (each unreadable file is named in the warnings).
    """
    files = list_slices(study_dir)
    volume: list[np.ndarray] = []

    def keep(k: int, raw: np.ndarray, header: SliceHeader) -> None:
        if not volume:
            volume.append(np.empty((len(files), header.rows, header.cols), dtype=np.int16))
        volume[0][k] = header.rescale.to_hu(raw)

    info = scan_study(study_dir, keep, decoder, files, on_restart=volume.clear)
    return Study(hu=in_head_first_order(volume[0], info.order), **vars(info))
