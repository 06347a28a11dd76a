"""Each fracture model's input of every study, built once from the cache and kept on disk, read back study by study,
so training memory does not grow with the number of studies.

`WORK_DIR/inputs/<key>/<split>/<uid>.npy` (the input array) and `<uid>.json` (its meta and the fingerprint of the
localisation it was built from); the key is a hash of the cache spec and the settings that shape the input. A
stored input whose localisation changed, or that cannot be read back, is built again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kernel_utils.io.cache import CacheSpec, cached_studies, load_cached
from kernel_utils.layout import atomic_file, layout_of, write_json
from kernel_utils.stages.fracture_data import FractureDataset
from kernel_utils.stages.study_localisation import LocalisationTable

log = logging.getLogger(__name__)
INPUTS_VERSION = 1
ARRAY_META = ("used", "crop_boxes", "slice_numbers")  # meta values that are arrays


class StudyInputs(Sequence):
    """The inputs of one model for the studies of a split: `inputs[i]` reads study i's array (uint8, the form's
    shape), `view(i)` maps it read-only (slice it to read only a part); `uids` and `metas` (what Grad-CAM boxes and
    the slice labels need) stay in memory."""

    def __init__(self, uids: list[str], paths: list[Path], metas: list[dict]):
        self.uids, self.paths, self.metas = uids, paths, metas

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        if i >= len(self.paths):
            raise IndexError(i)
        return np.load(self.paths[i], allow_pickle=False)

    def view(self, i: int) -> np.ndarray:
        return np.load(self.paths[i], mmap_mode="r", allow_pickle=False)

    def subset(self, index: Sequence[int]) -> StudyInputs:
        return StudyInputs([self.uids[i] for i in index], [self.paths[i] for i in index],
                           [self.metas[i] for i in index])


class Views(Sequence):
    """Parts of the arrays of `source`, read when asked: item j is `pick(source's array i, key)` for
    (i, key) = index[j] (a vertebra's block of a study, one slice of a sequence)."""

    def __init__(self, source: Sequence[np.ndarray], index: list[tuple[int, object]],
                 pick: Callable[[np.ndarray, object], np.ndarray]):
        self.source, self.index, self.pick = source, index, pick

    def __len__(self) -> int:
        return len(self.index)

    def view(self, j: int) -> np.ndarray:
        """Item j without reading more than it (a memory map when the source maps its arrays)."""
        i, key = self.index[j]
        return self.pick(self.source.view(i) if hasattr(self.source, "view") else self.source[i], key)

    def __getitem__(self, j: int) -> np.ndarray:
        """Item j in memory (a memory-mapped part is copied out, so no file stays mapped)."""
        x = self.view(j)
        return np.array(x) if isinstance(x, np.memmap) or not x.flags.c_contiguous else x


def _update_with_inputs(h, inputs: Sequence[np.ndarray]) -> None:
    """Stored inputs by their meta file (its localisation fingerprint) and the array file's size and time, which
    change whenever the input is built again; inputs in memory by their bytes."""
    if isinstance(inputs, StudyInputs):
        for uid, path in zip(inputs.uids, inputs.paths, strict=True):
            st, meta = path.stat(), path.with_suffix(".json")
            h.update(f"{uid}:{st.st_size}:{st.st_mtime_ns}:".encode() + (meta.read_bytes() if meta.exists() else b""))
    else:
        for x in inputs:
            h.update(np.ascontiguousarray(x).tobytes())


def data_fingerprint(inputs: Sequence[np.ndarray], targets: np.ndarray, slice_targets: np.ndarray | None = None,
                     extra: ExtraSlices | None = None) -> str:
    """Names what a form trains on: its inputs (`StudyInputs` or arrays), targets [S, 8], slice labels and extra
    labelled slices. Equal across runs that rebuilt nothing; `training.fit` does not resume a checkpoint saved under
    another (notebook 02 localised again, a label changed)."""
    h = hashlib.sha1()
    _update_with_inputs(h, inputs)
    for arr in (targets, slice_targets):
        if arr is not None:
            h.update(np.nan_to_num(np.asarray(arr, np.float32), nan=-1.0).tobytes())
    if extra is not None:
        _update_with_inputs(h, extra.store)
        h.update(np.asarray(extra.owners, np.int64).tobytes())
        for t in extra.targets:
            h.update(np.asarray(t, np.float32).tobytes())
    return h.hexdigest()[:16]


def input_key(settings, spec: CacheSpec) -> str:
    """Names the store of one input shape: the cache it is cut from and the settings that shape it."""
    text = json.dumps({"version": INPUTS_VERSION, "cache": spec.key, "form": settings.form,
                       "input": settings.input_fields()}, sort_keys=True, default=str)
    return f"{settings.form}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _jsonable(meta: dict) -> dict:
    return {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray | tuple) else v) for k, v in meta.items()}


def _from_json(meta: dict) -> dict:
    return {k: (np.asarray(v) if k in ARRAY_META else tuple(v) if isinstance(v, list) else v) for k, v in meta.items()}


def _stored_meta(x_path: Path, meta_path: Path, fingerprint: str) -> dict | None:
    """The stored meta when the stored input is whole and was built from this localisation, else None."""
    if not (x_path.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        np.load(x_path, mmap_mode="r", allow_pickle=False)  # the header and the size must agree
    except (OSError, ValueError) as e:
        log.warning("%s: stored input unreadable (%s); building it again", x_path, e)
        return None
    if meta.pop("fingerprint", None) != fingerprint:
        return None
    return _from_json(meta)


def save_input(x_path: Path, meta_path: Path, x: np.ndarray, meta: dict, fingerprint: str) -> None:
    with atomic_file(x_path) as tmp, open(tmp, "wb") as f:
        np.save(f, x, allow_pickle=False)
    write_json(meta_path, {"fingerprint": fingerprint, **_jsonable(meta)})


def build_inputs(data_dir: str | os.PathLike, work_dir, spec: CacheSpec, settings, split: str,
                 progress: bool = True) -> StudyInputs:
    """The inputs of every readable study of a split for the model `settings` describes (`settings.study_input`),
    from the cache and notebook 02's localisation (the whole-study fallback where there is none); studies whose
    cache cannot be read are logged and left out. Inputs stored by an earlier run are reused."""
    layout = layout_of(work_dir)
    localisation = LocalisationTable(layout)
    if settings.uses_localisation and not localisation.found:
        log.warning("no %s: every study falls back to seven even windows", layout.vertebrae)
    folder = layout.inputs(input_key(settings, spec), split)
    folder.mkdir(parents=True, exist_ok=True)
    uids, paths, metas = [], [], []
    studies = cached_studies(data_dir, split)
    for study_dir, seg in tqdm(studies, desc=f"{settings.name} inputs ({split})", disable=not progress, leave=False):
        uid = study_dir.name
        loc = localisation.for_study(uid)
        fingerprint = loc.fingerprint() if settings.uses_localisation else ""
        x_path, meta_path = folder / f"{uid}.npy", folder / f"{uid}.json"
        meta = _stored_meta(x_path, meta_path, fingerprint)
        if meta is None:
            try:
                entry = load_cached(work_dir, spec, study_dir, seg)
            except Exception as e:
                log.warning("%s: skipped (%s)", uid, e)
                continue
            x, meta = settings.study_input(entry, loc)
            save_input(x_path, meta_path, x, meta, fingerprint)
        uids.append(uid)
        paths.append(x_path)
        metas.append(meta)
    return StudyInputs(uids, paths, metas)


@dataclass
class ExtraSlices:
    """Labelled single slices of the training studies besides the sampled ones, for the study form's slice phase:
    `store[j]` holds study `owners[j]`'s slices (position in the train uids), uint8 [K, C, H, W], labelled
    `targets[j]` float [K]."""

    store: StudyInputs
    owners: list[int]
    targets: list[np.ndarray]

    def samples(self, index, image_channels: int | None, rotate_shift: bool) -> FractureDataset | None:
        """The slices of the studies `index` as augmented single slices (image [C, H, W], target [1]); None when
        they have none."""
        chosen = set(int(i) for i in index)
        picks = [(j, k) for j, owner in enumerate(self.owners) if owner in chosen
                 for k in range(len(self.targets[j]))]
        if not picks:
            return None
        targets = np.array([[self.targets[j][k]] for j, k in picks], np.float32)
        return FractureDataset(Views(self.store, picks, _slice_of), targets, augment=True,
                               image_channels=image_channels, rotate_shift=rotate_shift)

    @property
    def fractured(self) -> int:
        return int(sum(float(np.sum(t)) for t in self.targets))


def _slice_of(x: np.ndarray, k: int) -> np.ndarray:
    return x[k]


def extra_slice_inputs(data_dir: str | os.PathLike, work_dir, spec: CacheSpec, settings, uids: list[str],
                       labels: list[np.ndarray], progress: bool = True) -> ExtraSlices | None:
    """For a form that `wants_extra_slices`: the slices `settings.extra_slice_choice` picks from each train study's
    labels of every slice (`all_slice_labels`), cut by `settings.extra_slice_input` and stored under
    `inputs/<key>_extra/train/` (rebuilt when the choice or its labels change); a study whose cache cannot be read
    is logged and left out. None when the form wants none."""
    if not settings.wants_extra_slices:
        return None
    layout = layout_of(work_dir)
    folder = layout.inputs(f"{input_key(settings, spec)}_extra", "train")
    folder.mkdir(parents=True, exist_ok=True)
    studies = {study_dir.name: (study_dir, seg) for study_dir, seg in cached_studies(data_dir, "train")}
    owners, paths, metas, targets = [], [], [], []
    for i, (uid, z_labels) in enumerate(tqdm(list(zip(uids, labels, strict=True)), desc=f"{settings.name} extra "
                                             "labelled slices", disable=not progress, leave=False)):
        zs = settings.extra_slice_choice(z_labels)
        if not len(zs) or uid not in studies:
            continue
        fingerprint = hashlib.sha1(zs.astype(np.int64).tobytes() + z_labels[zs].astype(np.float32).tobytes())
        x_path, meta_path = folder / f"{uid}.npy", folder / f"{uid}.json"
        meta = _stored_meta(x_path, meta_path, fingerprint.hexdigest()[:16])
        if meta is None:
            try:
                entry = load_cached(work_dir, spec, *studies[uid])
            except Exception as e:
                log.warning("%s: extra labelled slices left out (%s)", uid, e)
                continue
            meta = {"zs": zs.tolist()}
            save_input(x_path, meta_path, settings.extra_slice_input(entry, zs), meta, fingerprint.hexdigest()[:16])
        owners.append(i)
        paths.append(x_path)
        metas.append(meta)
        targets.append(z_labels[zs].astype(np.float32))
    return ExtraSlices(StudyInputs([uids[i] for i in owners], paths, metas), owners, targets)
