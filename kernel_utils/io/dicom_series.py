"""A DICOM series as the kit sees it: each file's header (`SliceHeader`, its `Rescale` to HU), the study's files,
and their head-first order by ImagePositionPatient with duplicates, unreadable and stray files accounted for
(`SeriesInfo`, `Study`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


Z_DUPLICATE_TOLERANCE_MM = 1e-3
MIN_READABLE_SHARE = 0.5  # a study whose readable files are fewer than this share of its files fails
LISTED_PROBLEMS = 5  # unreadable files named one by one in a study's warnings; the rest are counted


class DicomReadError(RuntimeError):
    """A DICOM file that cannot be read or decoded; the message names the file and the reason."""


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


def slice_number(path: Path) -> int:
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
    files = sorted((p for p in folder.glob("*.dcm") if p.stem.isdigit()), key=slice_number)
    if not files:
        raise DicomReadError(f"{folder}: no <slice number>.dcm files")
    return files


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


@dataclass
class SeriesScan:
    """What one pass over a study's files read: kept file indices, their headers, the problems of the rest."""

    kept: list[int] = field(default_factory=list)
    headers: list[SliceHeader] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    other_sizes: list[tuple[int, int]] = field(default_factory=list)


def series_info(folder: Path, files: list[Path], scan: SeriesScan) -> SeriesInfo:
    """Head-first order (ImagePositionPatient z, never file names), duplicates dropped, the UID checked."""
    n_read = len(scan.kept)
    if n_read == 0 or n_read < MIN_READABLE_SHARE * len(files):
        raise DicomReadError(f"{folder}: {n_read} of {len(files)} files readable; first problem: "
                             f"{scan.problems[0] if scan.problems else 'none'}")
    headers = scan.headers
    kept = np.array(scan.kept)
    pos = np.array([h.position for h in headers], dtype=float)
    numbers = np.array([slice_number(files[k]) for k in kept])
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
