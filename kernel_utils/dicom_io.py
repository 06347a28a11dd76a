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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import generate_frames

from kernel_utils.dicom_guard import UNDEFINED_LENGTH, checked_pixel_length

log = logging.getLogger(__name__)

DECODERS = ("auto", "dicomsdl", "imagecodecs", "pydicom")
Z_DUPLICATE_TOLERANCE_MM = 1e-3
MIN_READABLE_SHARE = 0.5  # a study whose readable files are fewer than this share of its files fails
LISTED_PROBLEMS = 5  # unreadable files named one by one in a study's warnings; the rest are counted


class DicomReadError(RuntimeError):
    """A DICOM file that cannot be read or decoded; the message names the file and the reason."""


class SliceSizeMismatch(DicomReadError):
    """A file whose slice size differs from the series'; `shape` is its (rows, columns)."""

    def __init__(self, message: str, shape: tuple[int, int]):
        super().__init__(message)
        self.shape = shape


class _NotForNativeReader(Exception):
    """A file the native reader must not be given (cut, or less Pixel Data than its size): pydicom reads it."""


@dataclass(frozen=True)
class Rescale:
    """How a file's stored 16-bit values become HU: PixelRepresentation, BitsStored, RescaleSlope/Intercept."""

    signed: bool
    bits: int
    slope: float
    intercept: float

    def to_hu(self, raw: np.ndarray) -> np.ndarray:
        """Stored values (any 16-bit view) -> HU int16 of the same shape; exact, clipped to the int16 range."""
        return _to_hu(raw, self.signed, self.bits, self.slope, self.intercept)

    @classmethod
    def from_dataset(cls, ds) -> Rescale:
        """The rescale a pydicom dataset (header) declares; slope 1 and intercept 0 when absent."""
        return cls(int(ds.PixelRepresentation) == 1, int(ds.BitsStored),
                   float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0))

    def hu_table(self) -> np.ndarray:
        """int16 [65536]: the HU of every stored bit pattern, indexed by the pattern read as uint16."""
        patterns = np.arange(65536, dtype=np.uint16)
        return self.to_hu(patterns.view(np.int16) if self.signed else patterns)


@dataclass(frozen=True)
class SliceHeader:
    """What one file says about its slice (everything but the pixels)."""

    position: tuple[float, float, float]
    uid: str
    syntax: str
    decoder: str
    rescale: Rescale
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    thickness: float


@dataclass(kw_only=True)
class SeriesInfo:
    """A study's geometry and provenance, everything of a Study but its pixels.

    Attributes:
        uid: StudyInstanceUID read from the files.
        z: float64 [Z] ImagePositionPatient z of every kept slice, decreasing (head first).
        xy: float64 [Z, 2] ImagePositionPatient x, y (first pixel centre) of every kept slice.
        spacing: (dz, dy, dx) in mm; dz is the median step between kept slices.
        slice_numbers: int64 [Z] the file slice number (file name) of every kept slice.
        order: int64 [Z] index, in slice-number file order, of every kept slice (head first).
        rows, cols: the in-plane size of every slice.
        path: the study folder.
        transfer_syntax: the transfer syntax UID of the files.
        n_files: how many files were read.
        duplicates_dropped: files dropped because their z position was already present.
        unreadable: files dropped because they could not be read (each named in `warnings`).
        ignored: files in the folder not named `<slice number>.dcm`, left out.
        reversed: the file order ran feet to head (z increasing with slice number).
        decoder: which decoder produced the pixels.
    """

    uid: str
    z: np.ndarray
    xy: np.ndarray
    spacing: tuple[float, float, float]
    slice_numbers: np.ndarray
    order: np.ndarray
    rows: int
    cols: int
    path: str = ""
    transfer_syntax: str = ""
    n_files: int = 0
    duplicates_dropped: int = 0
    unreadable: int = 0
    ignored: int = 0
    reversed: bool = False
    decoder: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, H, W) of the kept slices."""
        return len(self.order), self.rows, self.cols


@dataclass(kw_only=True)
class Study(SeriesInfo):
    """One CT study, head first: `hu` int16 [Z, H, W] Hounsfield units, patient z decreasing along axis 0."""

    hu: np.ndarray


def _slice_number(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError as e:
        raise DicomReadError(f"{path}: file name is not a slice number") from e


def not_slice_files(study_dir: str | os.PathLike) -> list[Path]:
    """The .dcm files of a study folder not named `<slice number>.dcm` (a macOS `._1.dcm`, a copy `1 (2).dcm`)."""
    return sorted(p for p in Path(study_dir).glob("*.dcm") if not p.stem.isdigit())


def list_slices(study_dir: str | os.PathLike) -> list[Path]:
    """The `<slice number>.dcm` files of a study folder, in slice-number order (the order is only a tie-break);
    other .dcm files are left out with a warning."""
    folder = Path(study_dir)
    if not folder.is_dir():
        raise DicomReadError(f"{folder}: study folder not found")
    files = sorted((p for p in folder.glob("*.dcm") if p.stem.isdigit()), key=_slice_number)
    if not files:
        raise DicomReadError(f"{folder}: no <slice number>.dcm files")
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
    return _series_info(Path(study_dir), files, scan)


@dataclass
class _Scan:
    """What one pass over a study's files read: kept file indices, their headers, the problems of the rest."""

    kept: list[int] = field(default_factory=list)
    headers: list[SliceHeader] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    other_sizes: list[tuple[int, int]] = field(default_factory=list)


def _scan_files(files: list[Path], on_slice, sdl, decoder: str, buffer: _SliceBuffer) -> _Scan:
    scan = _Scan()
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


def _series_info(folder: Path, files: list[Path], scan: _Scan) -> SeriesInfo:
    """Head-first order (ImagePositionPatient z, never file names), duplicates dropped, the UID checked."""
    n_read = len(scan.kept)
    if n_read == 0 or n_read < MIN_READABLE_SHARE * len(files):
        raise DicomReadError(f"{folder}: {n_read} of {len(files)} files readable; first problem: "
                             f"{scan.problems[0] if scan.problems else 'none'}")
    headers = scan.headers
    kept = np.array(scan.kept)
    pos = np.array([h.position for h in headers], dtype=float)
    numbers = np.array([_slice_number(files[k]) for k in kept])
    local = np.lexsort((numbers, -pos[:, 2]))  # head first; equal z: lowest slice number first
    keep = np.ones(len(local), dtype=bool)
    keep[1:] = np.abs(np.diff(pos[local, 2])) > Z_DUPLICATE_TOLERANCE_MM
    local = local[keep]
    uids = {h.uid for h in headers}
    if len(uids) != 1:
        raise DicomReadError(f"{folder}: files from {len(uids)} studies: {sorted(uids)}")
    uid = uids.pop()
    warnings = []
    if uid != folder.name:
        warnings.append(f"{folder}: folder name differs from StudyInstanceUID {uid}")
    ignored = not_slice_files(folder)
    if ignored:
        warnings.append(f"{folder}: ignored {len(ignored)} files not named <slice number>.dcm: "
                        f"{', '.join(p.name for p in ignored[:LISTED_PROBLEMS])}")
    if scan.problems:
        more = len(scan.problems) - LISTED_PROBLEMS
        warnings.append(f"{folder}: dropped {len(scan.problems)} unreadable files of {len(files)}: "
                        + "; ".join(scan.problems[:LISTED_PROBLEMS]) + (f"; and {more} more" if more > 0 else ""))
    dropped = n_read - len(local)
    if dropped:
        warnings.append(f"{folder}: dropped {dropped} files with duplicate z positions")
    if len(local) == 1:
        warnings.append(f"{folder}: a single slice: the models see one axial slice of this study")
    for w in warnings:
        log.warning(w)
    z = pos[local, 2]
    first = headers[0]
    dz = float(np.median(-np.diff(z))) if len(z) > 1 else first.thickness
    return SeriesInfo(uid=uid, z=z, xy=pos[local, :2], spacing=(dz, *first.pixel_spacing),
                      slice_numbers=numbers[local], order=kept[local], rows=first.rows, cols=first.cols,
                      path=str(folder), transfer_syntax="/".join(sorted({h.syntax for h in headers})),
                      n_files=len(files), duplicates_dropped=dropped, unreadable=len(scan.problems),
                      ignored=len(ignored), reversed=bool(n_read > 1 and pos[-1, 2] > pos[0, 2]),
                      decoder="/".join(sorted({h.decoder for h in headers})), warnings=warnings)


def in_head_first_order(volume: np.ndarray, order: np.ndarray) -> np.ndarray:
    """volume [N, ...] in file order -> [len(order), ...] in `order`; a view when the order is plain or reversed."""
    n = len(volume)
    if np.array_equal(order, np.arange(n)):
        return volume
    if np.array_equal(order, np.arange(n)[::-1]):
        return volume[::-1]
    return volume[order]


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
