"""Faults of real data, injected into a synthetic dataset: cut DICOM files, stray and odd-sized slices, slices
without a position, segmentations that do not fit, corrupt checkpoints, pretrained files that would run code.

`inject_data_faults` puts one of each dataset fault into a dataset made by `kernel_utils.dev.synthetic`, each in a study
of its own where the dataset has enough, and returns what it did; `benchmarks/faults.py` and `tests/test_faults.py`
then run the kit on it and check that no single bad file ends a run, loses a study or runs code.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom

from kernel_utils.dev.dicom_writer import ENCODINGS

APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07\x00\x02\x00\x00"  # what macOS writes as `._<name>` beside a copied file
UNCOMPRESSED = tuple(name for name, (syntax, *_) in ENCODINGS.items() if not syntax.is_compressed)
COMPRESSED = tuple(name for name, (syntax, *_) in ENCODINGS.items() if syntax.is_compressed)


def slice_files(study_dir: str | os.PathLike) -> list[Path]:
    """The `<slice number>.dcm` files of a study, in slice-number order."""
    return sorted((p for p in Path(study_dir).glob("*.dcm") if p.stem.isdigit()), key=lambda p: int(p.stem))


def cut_file(path: str | os.PathLike, share: float) -> Path:
    """Keep the first `share` of a file's bytes, as an interrupted copy or download leaves it."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * share)])
    return path


def add_stray_file(study_dir: str | os.PathLike, name: str = "._1.dcm") -> Path:
    """An AppleDouble file (macOS metadata beside a copied file) named like a slice."""
    path = Path(study_dir) / name
    path.write_bytes(APPLEDOUBLE_MAGIC + b"Mac OS X        " + bytes(4000))
    return path


def resize_slice(path: str | os.PathLike, rows: int, cols: int) -> Path:
    """Rewrite one slice with another size (its pixels cropped or padded), uncompressed."""
    path = Path(path)
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    pixels = ds.pixel_array
    out = np.full((rows, cols), pixels.min(), dtype=pixels.dtype)
    r, c = min(rows, pixels.shape[0]), min(cols, pixels.shape[1])
    out[:r, :c] = pixels[:r, :c]
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = out.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def drop_position(path: str | os.PathLike) -> Path:
    """Remove ImagePositionPatient from one slice."""
    path = Path(path)
    ds = pydicom.dcmread(path)
    del ds.ImagePositionPatient
    ds.save_as(path, enforce_file_format=True)
    return path


def shift_segmentation(path: str | os.PathLike, mm: float = 50.0) -> Path:
    """Move a NIfTI's origin `mm` along patient z, its array and voxel sizes unchanged."""
    img = nib.load(str(path), mmap=False)  # read before the file is rewritten in place
    affine = img.affine.copy()
    affine[2, 3] += mm
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine, img.header), str(path))
    return Path(path)


def shorten_segmentation(path: str | os.PathLike) -> Path:
    """Drop the first array slice of a NIfTI (one slice fewer than its study), its affine unchanged."""
    img = nib.load(str(path), mmap=False)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, 1:], img.affine, img.header), str(path))
    return Path(path)


def half_file(path: str | os.PathLike) -> Path:
    """A checkpoint cut in half, as a full disk or a killed copy leaves it."""
    return cut_file(path, 0.5)


def garbage_file(path: str | os.PathLike, size: int = 4096, seed: int = 0) -> Path:
    """Random bytes where a file should be."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


class _RunsCode:
    """Unpickling this calls os.system: the attack a weights file from a stranger's Kaggle dataset can carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def code_running_weights(path: str | os.PathLike, marker: str | os.PathLike) -> Path:
    """A torch-loadable file whose unpickling creates `marker` (a harmless stand-in for any command)."""
    import torch

    path = Path(path)
    torch.save({"conv.weight": torch.zeros(1), "payload": _RunsCode(f"touch '{marker}'")}, path)
    return path


def _pick(studies: pd.DataFrame, used: set[str], split: str, encodings: tuple[str, ...] | None = None,
          segmented: bool = False, prefer_segmented: bool = False) -> pd.Series:
    """A study of `split` not used yet, of one of `encodings` when there is one, segmented when `segmented`
    (required) or `prefer_segmented` (preferred after the encoding)."""
    pool = studies[(studies.split == split) & (studies.segmented | (not segmented))]
    fresh = pool[~pool.uid.isin(used)]
    coded = fresh[fresh.encoding.isin(encodings)] if encodings else fresh
    choices = [coded[coded.segmented], coded, fresh] if prefer_segmented else [coded, fresh]
    for candidates in (*choices, pool):
        if len(candidates):
            row = candidates.iloc[0]
            used.add(row.uid)
            return row
    raise ValueError(f"no {split} study to put a fault in")


def inject_data_faults(data_dir: str | os.PathLike) -> pd.DataFrame:
    """One of each dataset fault in a synthetic dataset (train and test), each in its own study where possible.

    Returns:
        One row per fault: fault, split, uid, encoding, file, expected (what the kit should do).
    """
    data_dir = Path(data_dir)
    studies = pd.read_csv(data_dir / "_truth" / "studies.csv")
    used: set[str] = set()
    rows = []

    def record(fault: str, row: pd.Series, path: Path, expected: str) -> None:
        rows.append({"fault": fault, "split": row.split, "uid": row.uid, "encoding": row.encoding,
                     "file": str(path), "expected": expected})

    def middle_slice(row: pd.Series) -> Path:
        files = slice_files(data_dir / f"{row.split}_images" / row.uid)
        return files[len(files) // 2]

    for split in ("train", "test"):
        for fault, encodings in (("cut uncompressed slice", UNCOMPRESSED), ("cut JPEG Lossless slice", COMPRESSED)):
            row = _pick(studies, used, split, encodings, prefer_segmented=split == "train")
            record(fault, row, cut_file(middle_slice(row), 0.5), "slice dropped, study kept")
        row = _pick(studies, used, split)
        record("stray ._1.dcm", row, add_stray_file(data_dir / f"{split}_images" / row.uid), "file ignored")
    row = _pick(studies, used, "train")
    record("odd-sized slice", row, resize_slice(middle_slice(row), 40, 40), "slice dropped, study kept")
    row = _pick(studies, used, "test")
    record("slice without ImagePositionPatient", row, drop_position(middle_slice(row)), "slice dropped, study kept")
    row = _pick(studies, used, "train", segmented=True)
    record("NIfTI origin shifted 50 mm", row, shift_segmentation(data_dir / "segmentations" / f"{row.uid}.nii"),
           "mask aligned by the array axes, warning")
    row = _pick(studies, used, "train", segmented=True)
    record("NIfTI one slice short", row, shorten_segmentation(data_dir / "segmentations" / f"{row.uid}.nii"),
           "study kept without a mask")
    return pd.DataFrame(rows)


def checkpoint_fault_paths(work_dir: str | os.PathLike, profile: str) -> list[Path]:
    """Where an earlier run, killed or half copied, would leave notebook 03's per-vertebra checkpoints: its fold 0
    `_last.pt` and its fold 1 `_best.pt` (names from the profile's settings, as the notebook derives them)."""
    from kernel_utils.layout import WorkLayout
    from kernel_utils.stages.fracture_settings import VertebraSettings
    from kernel_utils.training import checkpoint_paths

    settings = VertebraSettings.for_profile(profile)
    cfg, models_dir = settings.cfg, WorkLayout(work_dir).models(settings.family)
    return [checkpoint_paths(models_dir, cfg, 0)[1], checkpoint_paths(models_dir, cfg, 1)[0]]


def inject_checkpoint_faults(work_dir: str | os.PathLike, profile: str) -> pd.DataFrame:
    """Garbage at `checkpoint_fault_paths`; returns one row per fault (fault, file, expected)."""
    last, best = (garbage_file(p, seed=i) for i, p in enumerate(checkpoint_fault_paths(work_dir, profile)))
    expected = "set aside as .corrupt, fold trained from scratch"
    return pd.DataFrame([{"fault": "garbage _last.pt", "file": str(last), "expected": expected},
                         {"fault": "garbage _best.pt", "file": str(best), "expected": expected}])
