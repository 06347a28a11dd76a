"""A synthetic RSNA 2022 dataset in the exact competition layout, with ground truth beside it.

    python -m kernel_utils.dev.synthetic --out DIR --train 40 --test 10 --size 128 --seed 0 [--difficulty 0.5]

writes `train.csv`, `test.csv`, `sample_submission.csv`, `train_bounding_boxes.csv`, `train_images/<uid>/<n>.dcm`,
`test_images/...`, `segmentations/<uid>.nii` and `_truth/` (per-study labels, fractures, quirks; test labels).
Rates of the real data's quirks come from `../shared/reference` (see `REAL_RATES`); every study is rendered from
its own seed, so one study can be re-rendered alone (`render_study(spec)`) and the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kernel_utils.dev.dicom_writer import (
    ENCODINGS,
    SeriesGeometry,
    hu_to_stored,
    stored_to_hu,
    write_ct_slice,
)
from kernel_utils.dev.phantom import Patient, render_slice, sample_patient

VERTEBRAE = [f"C{i}" for i in range(1, 8)]
TARGETS = VERTEBRAE + ["patient_overall"]
UID_PREFIX = "1.2.826.0.1.3680043."
PUBLIC_TEST_STUB_UIDS = ("1.2.826.0.1.3680043.10197", "1.2.826.0.1.3680043.10454", "1.2.826.0.1.3680043.10690")

# Measured on ../shared/reference (train.csv, train_bounding_boxes.csv, meta_train_clean.csv.zip).
REAL_RATES = {
    "positive": 961 / 2019,
    "boxed_given_positive": 235 / 961,
    "reversed": 197 / 2019,
    "first_slice_not_1": 10 / 2019,
    "segmented": 87 / 2019,
    "large_768": 2 / 2019,
}
# Not measurable from the reference files; chosen so every kind appears in a few dozen studies.
ENCODING_SHARES = {"explicit_int16": 0.55, "implicit_int16": 0.12, "explicit_int16_intercept0": 0.08,
                   "jpeg_lossless_uint12": 0.25}
# Fracture patterns C1..C7 of the 961 positive train studies: pattern -> count (train.csv).
FRACTURE_PATTERNS = dict(item.split(":") for item in (
    "0000001:223 0100000:180 0000010:82 0000011:77 1000000:64 1100000:42 0000110:36 0000100:28 0001000:28 "
    "0000111:21 0001100:20 0010000:18 0011000:13 0100001:9 0100011:9 0110000:7 1000001:7 0001111:6 0001110:6 "
    "0001001:5 0000101:5 1100001:4 1000100:4 0111110:3 0011111:3 0100010:3 1000011:3 0010100:3 0011110:2 "
    "1000111:2 0110010:2 1110001:2 1000110:2 0001011:2 1001110:2 0100100:2 0110001:2 1100010:2 0111111:2 "
    "0111000:1 0011100:1 1110000:1 0010111:1 1110100:1 1101000:1 0100111:1 0011010:1 0101000:1 1100100:1 "
    "1001000:1 1010110:1 0111001:1 1010100:1 0111100:1 0001101:1 0101110:1 0010011:1 1000010:1 1010101:1 "
    "0110100:1 0101100:1 1101001:1 0101101:1 0001010:1 0010010:1 1011110:1 0010001:1 0101011:1 1100011:1"
).split())
# (SliceThickness, slice spacing) -> studies, from the per-slice metadata of all 2019 train studies.
THICKNESS_SPACING = [(0.5, 0.4, 175), (0.6, 0.4, 144), (0.625, 0.3125, 146), (0.625, 0.45, 26),
                     (0.625, 0.625, 869), (0.9, 0.45, 24), (1.0, 0.5, 111), (1.0, 0.8, 218), (1.0, 1.0, 269)]
QUIRKS = ("reversed", "first_slice", "duplicated", "large", "implicit_int16", "explicit_int16_intercept0",
          "jpeg_lossless_uint12")
PROFILE_SIZES = {"smoke": (12, 4, 64), "demo": (48, 8, 96), "bench": (240, 40, 128), "full": (4, 2, 512)}


@dataclass(frozen=True)
class StudySpec:
    """Everything that decides one synthetic study's bytes."""

    uid: str
    split: str
    seed: tuple[int, int]
    rows: int
    cols: int
    pixel_spacing: float
    thickness: float
    spacing: float
    encoding: str
    reversed: bool = False
    first_slice: int = 1
    duplicated: bool = False
    fractured: tuple[int, ...] = ()
    difficulty: float = 0.5
    segmented: bool = False
    boxed: bool = False


@dataclass
class RenderedStudy:
    """A rendered study, head first: hu int16 [Z, H, W], labels uint8, fracture bool, z and slice numbers [Z]."""

    spec: StudySpec
    hu: np.ndarray
    raw: np.ndarray
    labels: np.ndarray
    fracture: np.ndarray
    z: np.ndarray
    slice_numbers: np.ndarray
    geometry: SeriesGeometry
    patient: Patient


def _choose(rng: np.random.Generator, table: dict[str, float]) -> str:
    keys = list(table)
    p = np.array([table[k] for k in keys], dtype=float)
    return keys[rng.choice(len(keys), p=p / p.sum())]


def plan_dataset(n_train: int, n_test: int, size: int = 128, seed: int = 0, difficulty: float = 0.5,
                 segmented_share: float = 0.3, ensure_quirks: bool = True) -> list[StudySpec]:
    """Draw the specs of every study: labels from the real patterns, quirks at the real rates.

    With `ensure_quirks`, each quirk of QUIRKS appears at least once when there are enough studies (tests and
    small datasets need them; the real rates would give none of the rare ones). `segmented_share` is higher than
    the real 4.3% so that the segmentation stage has studies to learn from at small dataset sizes.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    numbers = rng.choice(np.arange(1000, 33000), size=n, replace=False)
    patterns = list(FRACTURE_PATTERNS)
    weights = np.array([int(FRACTURE_PATTERNS[k]) for k in patterns], dtype=float)
    quirk_of: dict[int, str] = {}
    if ensure_quirks and n >= len(QUIRKS) + 1:
        for i, quirk in zip(rng.permutation(n)[: len(QUIRKS)], QUIRKS, strict=True):
            quirk_of[int(i)] = quirk
    pairs = np.array([c for *_, c in THICKNESS_SPACING], dtype=float)
    specs = []
    for i in range(n):
        split = "train" if i < n_train else "test"
        fractured: tuple[int, ...] = ()
        if rng.random() < REAL_RATES["positive"]:
            pattern = patterns[rng.choice(len(patterns), p=weights / weights.sum())]
            fractured = tuple(k + 1 for k, c in enumerate(pattern) if c == "1")
        encoding = _choose(rng, ENCODING_SHARES)
        thickness, spacing, _ = THICKNESS_SPACING[rng.choice(len(pairs), p=pairs / pairs.sum())]
        quirk = quirk_of.get(i)
        large = quirk == "large" or rng.random() < REAL_RATES["large_768"]
        side = int(round(size * 1.5 / 2) * 2) if large else size
        if quirk in ENCODINGS:
            encoding = quirk
        duplicated = quirk == "duplicated"
        first = 1
        if quirk == "first_slice" or rng.random() < REAL_RATES["first_slice_not_1"]:
            first = int(rng.choice([2, 2, 2, 59]))
        scale = 512.0 / size
        specs.append(StudySpec(
            uid=f"{UID_PREFIX}{numbers[i]}", split=split, seed=(seed, i), rows=side, cols=side,
            pixel_spacing=float(rng.uniform(0.28, 0.42) * scale * size / side),
            thickness=float(thickness * scale), spacing=float(spacing * scale), encoding=encoding,
            reversed=quirk == "reversed" or (quirk is None and rng.random() < REAL_RATES["reversed"]),
            first_slice=first, duplicated=duplicated, fractured=fractured, difficulty=difficulty,
            segmented=split == "train" and not duplicated and rng.random() < segmented_share,
            boxed=split == "train" and bool(fractured) and rng.random() < REAL_RATES["boxed_given_positive"]))
    train = [k for k, s in enumerate(specs) if s.split == "train" and not s.duplicated]
    if train and not any(specs[k].segmented for k in train):  # the segmentation stage needs at least two
        for k in train[: min(2, len(train))]:
            specs[k] = dataclasses.replace(specs[k], segmented=True)
    positives = [k for k, s in enumerate(specs) if s.split == "train" and s.fractured]
    if positives and not any(specs[k].boxed for k in positives):
        specs[positives[0]] = dataclasses.replace(specs[positives[0]], boxed=True)
    return specs


def render_study(spec: StudySpec) -> RenderedStudy:
    """Render one study head first; deterministic in spec.seed."""
    rng = np.random.default_rng(list(spec.seed) + [7])
    patient = sample_patient(rng, spec.fractured, spec.difficulty, z_c1_top=float(rng.uniform(-60, 420)))
    c1_top = patient.vertebrae[0].z_top
    c7_bottom = patient.vertebrae[6].z_bottom
    z_top = patient.skull_z + rng.uniform(12, 40)
    z_bottom = c7_bottom - rng.uniform(28, 65)
    n = int(np.floor((z_top - z_bottom) / spec.spacing)) + 1
    z = np.round(z_top - spec.spacing * np.arange(n), 4)

    ps = spec.pixel_spacing
    sx, sy = patient.spine_xy(0.5 * (c1_top + c7_bottom))
    xc = sx + rng.uniform(-10, 10)
    yc = sy + 0.5 * patient.neck_dy + rng.uniform(-8, 12)
    x0 = round(xc - 0.5 * (spec.cols - 1) * ps, 3)
    y0 = round(yc - 0.5 * (spec.rows - 1) * ps, 3)
    geom = SeriesGeometry(x0=x0, y0=y0, row_spacing=ps, col_spacing=ps, thickness=spec.thickness)

    ss = 3 if max(spec.rows, spec.cols) <= 160 else 1  # supersampling for partial-volume edges
    offsets = (np.arange(ss) - (ss - 1) / 2) / ss
    xs = (x0 + (np.arange(spec.cols)[:, None] + offsets[None, :]).ravel() * ps).astype(np.float32)
    ys = (y0 + (np.arange(spec.rows)[:, None] + offsets[None, :]).ravel() * ps).astype(np.float32)
    X, Y = np.meshgrid(xs, ys)
    c = ss // 2
    rr, cc = np.meshgrid((np.arange(spec.rows) - (spec.rows - 1) / 2) * ps,
                         (np.arange(spec.cols) - (spec.cols - 1) / 2) * ps, indexing="ij")
    outside = rr**2 + cc**2 > (0.5 * min(spec.rows, spec.cols) * ps) ** 2
    noise = rng.uniform(8.0, 25.0)
    blur = rng.uniform(0.45, 0.75)

    raw = np.empty((n, spec.rows, spec.cols), dtype=np.int16 if ENCODINGS[spec.encoding][1] else np.uint16)
    labels = np.empty((n, spec.rows, spec.cols), dtype=np.uint8)
    fracture = np.empty((n, spec.rows, spec.cols), dtype=bool)
    for k, zk in enumerate(z):
        hu_ss, lab_ss, frac_ss = render_slice(patient, X, Y, float(zk))
        hu = hu_ss.reshape(spec.rows, ss, spec.cols, ss).mean(axis=(1, 3))
        hu = cv2.GaussianBlur(hu, (0, 0), blur)
        hu += rng.normal(0.0, noise, size=hu.shape).astype(np.float32)
        raw[k] = hu_to_stored(hu, spec.encoding, outside)
        labels[k] = lab_ss[c::ss, c::ss]
        fracture[k] = frac_ss.reshape(spec.rows, ss, spec.cols, ss).any(axis=(1, 3))
    numbers = np.arange(n) + spec.first_slice
    if spec.reversed:
        numbers = numbers[::-1]
    return RenderedStudy(spec=spec, hu=stored_to_hu(raw, spec.encoding), raw=raw, labels=labels, fracture=fracture,
                         z=z, slice_numbers=numbers, geometry=geom, patient=patient)


def nifti_affine(geom: SeriesGeometry, rows: int, z_ascending: np.ndarray) -> np.ndarray:
    """RAS affine of a competition-style LAS array (cols, rows reversed, ascending z) for this DICOM grid."""
    dz = float(np.median(np.diff(z_ascending))) if len(z_ascending) > 1 else geom.thickness
    return np.array([
        [-geom.col_spacing, 0.0, 0.0, -geom.x0],
        [0.0, geom.row_spacing, 0.0, -(geom.y0 + (rows - 1) * geom.row_spacing)],
        [0.0, 0.0, dz, float(z_ascending[0])],
        [0.0, 0.0, 0.0, 1.0]])


def write_segmentation(path: str, study: RenderedStudy) -> None:
    """Write labels as the competition does: (cols, rows reversed, ascending z), LAS, uint8, with a true affine."""
    lab = study.labels[::-1]  # head first -> ascending z
    data = np.ascontiguousarray(lab.transpose(2, 1, 0)[:, ::-1, :])
    img = nib.Nifti1Image(data, nifti_affine(study.geometry, study.spec.rows, study.z[::-1]))
    img.header.set_data_dtype(np.uint8)
    tmp = path + ".tmp.nii"
    nib.save(img, tmp)
    os.replace(tmp, path)


def fracture_boxes(study: RenderedStudy, margin_mm: float = 5.0) -> pd.DataFrame:
    """One box per axial slice the fracture crosses (pixel x, y, width, height; file slice_number)."""
    rows = []
    pad = margin_mm / study.geometry.col_spacing
    for k in np.flatnonzero(study.fracture.any(axis=(1, 2))):
        r, c = np.nonzero(study.fracture[k])
        x1, x2 = max(c.min() - pad, 0.0), min(c.max() + 1 + pad, study.spec.cols)
        y1, y2 = max(r.min() - pad, 0.0), min(r.max() + 1 + pad, study.spec.rows)
        rows.append({"StudyInstanceUID": study.spec.uid, "x": float(x1), "y": float(y1), "width": float(x2 - x1),
                     "height": float(y2 - y1), "slice_number": int(study.slice_numbers[k])})
    return pd.DataFrame(rows, columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"])


def write_study(spec: StudySpec, out: str) -> dict:
    """Render and write one study (DICOM files, NIfTI, truth); returns its row of the truth table."""
    study = render_study(spec)
    folder = os.path.join(out, f"{spec.split}_images", spec.uid)
    os.makedirs(folder, exist_ok=True)
    order = np.argsort(study.slice_numbers)  # write in file order
    copies = 2 if spec.duplicated else 1
    n = len(order)
    for copy in range(copies):
        for k in order:
            number = int(study.slice_numbers[k]) + copy * n
            write_ct_slice(os.path.join(folder, f"{number}.dcm"), spec.uid, number, float(study.z[k]),
                           study.geometry, study.raw[k], spec.encoding)
    if spec.segmented:
        os.makedirs(os.path.join(out, "segmentations"), exist_ok=True)
        write_segmentation(os.path.join(out, "segmentations", f"{spec.uid}.nii"), study)
    truth = os.path.join(out, "_truth")
    os.makedirs(truth, exist_ok=True)
    np.savez_compressed(os.path.join(truth, f"{spec.uid}.npz"), labels=study.labels, fracture=study.fracture,
                        z=study.z, slice_numbers=study.slice_numbers)
    boxes = fracture_boxes(study) if spec.boxed else fracture_boxes(study).iloc[:0]
    row = {**dataclasses.asdict(spec), "fractured": " ".join(f"C{k}" for k in spec.fractured),
           "n_slices": n, "n_files": n * copies, "z_top": float(study.z[0]), "z_bottom": float(study.z[-1]),
           "x0": study.geometry.x0, "y0": study.geometry.y0, "transfer_syntax": str(ENCODINGS[spec.encoding][0]),
           "fracture_slices": int(study.fracture.any(axis=(1, 2)).sum())}
    row.pop("seed")
    return {"row": row, "boxes": boxes.to_dict("records")}


def label_table(specs: list[StudySpec]) -> pd.DataFrame:
    """train.csv-shaped labels: StudyInstanceUID, patient_overall, C1..C7 (int64)."""
    rows = [{"StudyInstanceUID": s.uid, "patient_overall": int(bool(s.fractured)),
             **{f"C{k}": int(k in s.fractured) for k in range(1, 8)}} for s in specs]
    return pd.DataFrame(rows, columns=["StudyInstanceUID", "patient_overall", *VERTEBRAE])


def test_table(specs: list[StudySpec], public_stub: bool = False) -> pd.DataFrame:
    """test.csv: row_id, StudyInstanceUID, prediction_type; 8 rows a study, or the real 3-row public stub."""
    if public_stub:
        uids = PUBLIC_TEST_STUB_UIDS
        return pd.DataFrame({"row_id": [f"{u}_C1" for u in uids], "StudyInstanceUID": uids,
                             "prediction_type": ["C1"] * 3})
    rows = [(f"{s.uid}_{t}", s.uid, t) for s in specs for t in TARGETS]
    return pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"])


def _write_csv(df: pd.DataFrame, path: str) -> None:
    tmp = path + ".tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def make_dataset(out: str, n_train: int = 40, n_test: int = 10, size: int = 128, seed: int = 0,
                 difficulty: float = 0.5, public_test_stub: bool = False, segmented_share: float = 0.3,
                 workers: int | None = None, progress: bool = True) -> list[StudySpec]:
    """Write a whole synthetic dataset in the competition layout under `out`; returns the specs."""
    specs = plan_dataset(n_train, n_test, size, seed, difficulty, segmented_share)
    os.makedirs(out, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(specs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(write_study, specs, [out] * len(specs)), total=len(specs),
                                desc="synthetic studies", disable=not progress))
    else:
        results = [write_study(s, out) for s in tqdm(specs, desc="synthetic studies", disable=not progress)]
    train = [s for s in specs if s.split == "train"]
    test = [s for s in specs if s.split == "test"]
    _write_csv(label_table(train), os.path.join(out, "train.csv"))
    boxes = pd.DataFrame([b for r in results for b in r["boxes"]],
                         columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"])
    _write_csv(boxes, os.path.join(out, "train_bounding_boxes.csv"))
    tests = test_table(test, public_test_stub)
    _write_csv(tests, os.path.join(out, "test.csv"))
    _write_csv(pd.DataFrame({"row_id": tests.row_id, "fractured": 0.5}), os.path.join(out, "sample_submission.csv"))
    _write_csv(pd.DataFrame([r["row"] for r in results]), os.path.join(out, "_truth", "studies.csv"))
    _write_csv(label_table(test), os.path.join(out, "_truth", "test_labels.csv"))
    with open(os.path.join(out, "_truth", "dataset.json"), "w") as f:
        json.dump({"n_train": n_train, "n_test": n_test, "size": size, "seed": seed, "difficulty": difficulty,
                   "public_test_stub": public_test_stub, "segmented_share": segmented_share}, f, indent=1)
    return specs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write the dataset into")
    ap.add_argument("--profile", choices=sorted(PROFILE_SIZES), help="preset train/test/size (overridden by flags)")
    ap.add_argument("--train", type=int)
    ap.add_argument("--test", type=int)
    ap.add_argument("--size", type=int, help="in-plane pixels (512 = real size; slice counts scale with it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difficulty", type=float, default=0.5, help="0 = obvious displaced fractures, 1 = hairline")
    ap.add_argument("--segmented-share", type=float, default=0.3, help="share of train studies with a NIfTI")
    ap.add_argument("--public-test-stub", action="store_true", help="write the real 3-row public test.csv")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    n_train, n_test, size = PROFILE_SIZES[args.profile or "smoke"]
    make_dataset(args.out, args.train if args.train is not None else n_train,
                 args.test if args.test is not None else n_test, args.size or size, args.seed, args.difficulty,
                 args.public_test_stub, args.segmented_share, args.workers)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
