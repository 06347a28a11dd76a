"""The stage contract: every study-level fracture model (notebook 03's two CNN + BiLSTM forms, notebook 04's ViT)
is trained, predicted and saved by the same three calls, here once.

A form's settings (`VertebraSettings`, `StudySettings`, `ViTSettings`) give:
    name, form, family (models folder), n_folds, cfg (the training config), uses_localisation,
    study_input(entry, localisation) -> (uint8 input of one study, meta), in_channels(input),
    image_channels(channels), trains_on_vertebrae, slices_first, wants_extra_slices (and then
    extra_slice_choice(labels), extra_slice_input(entry, zs)), labels_from_localisation, slice_loss,
    vertebra_block(input, k),
    patient_modes, rotate_shift, to_json() / from_json().
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from kernel_utils.io.cache import CacheSpec
from kernel_utils.layout import WorkLayout, layout_of, read_json
from kernel_utils.stages.fracture import (
    cross_validate_fracture,
    fold_mean,
    load_fold_models,
    predict_fracture,
    save_predictions,
    with_patient_mode,
)
from kernel_utils.stages.fracture_data import all_slice_labels, slice_targets_of
from kernel_utils.stages.fracture_settings import StudySettings, VertebraSettings
from kernel_utils.stages.inputs import ExtraSlices, StudyInputs, build_inputs, extra_slice_inputs
from kernel_utils.stages.study_localisation import LocalisationTable, StudyLocalisation
from kernel_utils.stages.vit import ViTSettings

log = logging.getLogger(__name__)
FORMS = {cls.form: cls for cls in (VertebraSettings, StudySettings, ViTSettings)}


def settings_from_meta(meta: dict):
    """The settings a `predictions/<name>.json` was saved with."""
    return FORMS[meta["form"]].from_json(meta["settings"])


@dataclass
class StageRun:
    """What `train_and_predict` leaves for a notebook's tables and figures."""

    settings: object
    cv: dict
    train: StudyInputs
    test: StudyInputs
    test_pred: pd.DataFrame
    models: list[torch.nn.Module]
    seconds: dict = field(default_factory=dict)

    def timing_row(self) -> dict:
        n, m = max(len(self.train), 1), max(len(self.test), 1)
        return {"model": self.settings.name, "run": self.settings.cfg.run_name,
                "patient_overall": self.cv["patient_mode"], "inputs s/study": self.seconds["inputs"] / n,
                "train s/study (all folds)": self.seconds["train"] / n, "test s/study": self.seconds["test"] / m}


def slice_labels_of(data_dir, work_dir, spec: CacheSpec, settings, train: StudyInputs, labels: pd.DataFrame,
                    boxes: pd.DataFrame, progress: bool = True) -> tuple[np.ndarray, ExtraSlices | None]:
    """What a form's slice labels need: the labels of its sampled slices (`slice_targets_of`) and the extra labelled
    slices of a form that `wants_extra_slices`; vertebra ranges from notebook 02 where the form labels slices
    from them (a warning where there are none: then only the boxes label)."""
    ranges = None
    if settings.labels_from_localisation:
        localisation = LocalisationTable(layout_of(work_dir))
        if not localisation.found:
            log.warning("no %s: the study form's slices are labelled from train_bounding_boxes.csv alone",
                        layout_of(work_dir).vertebrae)
        ranges = localisation.by_uid
    slice_targets = slice_targets_of(train.uids, train.metas, labels, boxes, ranges)
    extra = None
    if settings.wants_extra_slices:
        every = all_slice_labels(train.uids, train.metas, labels, boxes, ranges)
        extra = extra_slice_inputs(data_dir, work_dir, spec, settings, train.uids, every, progress)
    return slice_targets, extra


def train_and_predict(settings, data_dir: str | os.PathLike, work_dir: str | os.PathLike | WorkLayout,
                      spec: CacheSpec, labels: pd.DataFrame, boxes: pd.DataFrame | None = None,
                      progress: bool = True) -> StageRun:
    """Cross-validate one model on the train studies, predict the test studies with its fold models and save both
    (`predictions/<name>_oof.csv`, `_test.csv`, `<name>.json`); weights under `models/<family>/`. Inputs are built
    once (`stages/inputs.py`) and read study by study. `boxes` (`train_bounding_boxes.csv`) gives the slice labels
    of a form that trains its CNN on slices first or adds the per-slice loss."""
    layout = layout_of(work_dir)
    models_dir = layout.models(settings.family)
    start = time.perf_counter()
    train = build_inputs(data_dir, layout.root, spec, settings, "train", progress)
    built = time.perf_counter()
    wants_slices = boxes is not None and (settings.slices_first or settings.slice_loss > 0)
    slice_targets, extra = slice_labels_of(data_dir, layout.root, spec, settings, train, labels, boxes, progress) \
        if wants_slices else (None, None)
    cv = cross_validate_fracture(train.uids, train, labels, settings, models_dir, progress, slice_targets, extra)
    trained = time.perf_counter()
    n_folds = len(set(cv["folds"].values()))
    models = load_fold_models(settings, settings.in_channels(train[0]), models_dir, n_folds)
    test = build_inputs(data_dir, layout.root, spec, settings, "test", progress)
    test_pred = predict_fracture(models, test.uids, test, settings, cv["patient_mode"])
    save_predictions(layout, settings, cv["oof"], test_pred, {"patient_mode": cv["patient_mode"],
                                                              "patient_scores": cv["patient_scores"],
                                                              "n_folds": n_folds})
    seconds = {"inputs": built - start, "train": trained - built, "test": time.perf_counter() - trained}
    return StageRun(settings, cv, train, test, test_pred, models, seconds)


class TrainedModel:
    """A saved model at inference: its settings, fold models and patient mode, read from
    `predictions/<name>.json` and `models/<family>/`; `predict(entry, localisation)` gives one study's [8]."""

    def __init__(self, work_dir: str | os.PathLike | WorkLayout, name: str):
        layout = layout_of(work_dir)
        meta = read_json(layout.model_meta(name))
        self.name, self.settings = name, settings_from_meta(meta)
        self.patient_mode = meta.get("patient_mode", "head")
        self.folder = layout.models(self.settings.family)
        self.n_folds = int(meta["n_folds"])
        self.models: list[torch.nn.Module] | None = None

    def predict(self, entry: dict, localisation: StudyLocalisation, clock=None) -> np.ndarray:
        """P(C1..C7, patient_overall) of one study, float [8]; `clock.data()` times the input building."""
        with clock.data() if clock is not None else contextlib.nullcontext():
            x, _ = self.settings.study_input(entry, localisation)
        if self.models is None:
            self.models = load_fold_models(self.settings, self.settings.in_channels(x), self.folder, self.n_folds)
        probs = fold_mean(self.models, [x], self.settings.cfg.batch_size)
        return with_patient_mode(probs, self.patient_mode)[0]
