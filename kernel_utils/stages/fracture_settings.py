"""The two CNN + BiLSTM forms of notebook 03 as typed settings: what each trains, how its input of one study is
made, and the profile overrides. Both follow the stage contract of `stages/stage.py` (as `ViTSettings` does).

Per vertebra (the winners' form): each of C1..C7 is a sequence of 2.5D crops; the model trains on single vertebrae
(seven samples a study), with a per-slice auxiliary loss where `train_bounding_boxes.csv` tells which sampled
slices hold the fracture, then its patient head on the frozen vertebra features.
Study level (seed 002): evenly spaced whole slices, three windows as colours, the Otsu crop; the CNN first learns
single slices, then the BiLSTM the sequences of its frozen features (`train="end_to_end"` trains both at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kernel_utils.settings import StageSettings
from kernel_utils.stages.fracture_data import (
    crop_box_on_cache,
    crop_slices,
    entry_meta,
    evenly_spaced,
    study_sequence,
    study_slices,
    vertebra_stacks,
)
from kernel_utils.stages.study_localisation import StudyLocalisation

FORMS = ("vertebra", "study")
SLICE_LABELS = ("sampled", "all_boxed", "vertebrae")


@dataclass(frozen=True)
class CnnLstmSettings(StageSettings):
    """What both CNN + BiLSTM forms have: folds, the backbone and its weights file, the optimiser, the BiLSTM width.
    `variant` names a second model of one form apart (another backbone for the blend)."""

    family: ClassVar[str] = "fracture"

    n_folds: int = 5
    variant: str = ""
    model: str = ""
    pretrained_path: str = ""
    epochs: int = 15
    max_steps_per_epoch: int = 0
    batch_size: int = 8
    lr: float = 1e-3
    patience: int = 4
    hidden: int = 128

    @property
    def name(self) -> str:
        return f"cnn_lstm_{self.form}" + (f"_{self.variant}" if self.variant else "")

    @staticmethod
    def in_channels(x: np.ndarray) -> int:
        return int(x.shape[-3])


@dataclass(frozen=True)
class VertebraSettings(CnnLstmSettings):
    """Per-vertebra CNN + BiLSTM.

    Attributes:
        n_slices, context, step, crop: N slices per vertebra, neighbours at -context..context times step as
            channels, each crop resized to crop x crop.
        channel: the cached window the 2.5D stack is cut from (0 soft tissue, 1 standard bone, 2 gross bone).
        train_on: "vertebrae" (one sample per vertebra, then the patient head) or "studies" (end to end).
        rotate_shift: the small rotation and shift augmentation (False: flips and intensity jitter only).
        slice_loss: weight of the per-slice auxiliary loss (0 turns it off).
    """

    form: ClassVar[str] = "vertebra"
    stage: ClassVar[str] = "cnn_lstm_vertebra"
    PROFILES: ClassVar[dict[str, dict]] = {
        "smoke": dict(n_folds=2, epochs=1, max_steps_per_epoch=2, batch_size=4, n_slices=5, crop=32,
                      model="tf_efficientnetv2_b0"),
        "demo": dict(n_folds=2, epochs=8, patience=8, n_slices=7, crop=32, model="resnet10t"),
        "bench": dict(epochs=25, crop=64, model="tf_efficientnetv2_b0"),
        "full": dict(),
    }

    model: str = "tf_efficientnetv2_s"
    n_slices: int = 15
    context: int = 1
    step: int = 1
    crop: int = 128
    channel: int = 2
    train_on: str = "vertebrae"
    rotate_shift: bool = False
    slice_loss: float = 1.0

    uses_localisation: ClassVar[bool] = True

    def input_fields(self) -> dict:
        return {k: getattr(self, k) for k in ("n_slices", "context", "step", "crop", "channel")}

    def study_input(self, entry: dict, loc: StudyLocalisation) -> tuple[np.ndarray, dict]:
        """uint8 [7, N, 2 * context + 2, crop, crop] and its meta (used slices [7, N], crop boxes [7, 4])."""
        meta = entry_meta(entry)
        x, meta["used"], meta["crop_boxes"] = vertebra_stacks(
            entry["images"], loc.load_mask(), loc.rows, self.n_slices, self.context, self.step, self.crop,
            self.channel)
        return x, meta

    def image_channels(self, channels: int) -> int:
        """Leading channels that get intensity jitter: all but the mask."""
        return channels - 1

    @property
    def trains_on_vertebrae(self) -> bool:
        return self.train_on == "vertebrae"

    slices_first: ClassVar[bool] = False
    wants_extra_slices: ClassVar[bool] = False
    labels_from_localisation: ClassVar[bool] = False
    patient_modes: ClassVar[tuple[str, ...]] = ("head", "product")

    @staticmethod
    def vertebra_block(x: np.ndarray, k: int) -> np.ndarray:
        return x[k]


@dataclass(frozen=True)
class StudySettings(CnnLstmSettings):
    """Seed 002's study-level ResNet + BiLSTM.

    Attributes:
        n_slices, size: N slices evenly spaced through the study, each Otsu-cropped and resized to size x size.
        train: "slices_then_sequence" (seed 002: the CNN on labelled slices, then the BiLSTM on its frozen
            features, extracted once) or "end_to_end".
        sequence_epochs, sequence_lr: the BiLSTM's training on the frozen features.
        rotate_shift: the small rotation and shift augmentation (seed 002's), besides flips and jitter.
        slice_labels: what the CNN learns from first: "sampled" (the sampled slices whose label
            `train_bounding_boxes.csv` gives), "all_boxed" (also up to `extra_slices` other boxed slices a training
            study) or
            "vertebrae" (besides the boxes, the fractured studies without boxes labelled from train.csv's
            vertebrae and notebook 02's vertebra ranges, `study_slice_labels`, and up to `extra_slices` unsampled
            labelled slices a study).
        extra_slices: at most this many unsampled slices a study join the slice phase, fractured ones first
            (`extra_slice_choice`; stored on disk).
    """

    form: ClassVar[str] = "study"
    stage: ClassVar[str] = "cnn_lstm_study"
    PROFILES: ClassVar[dict[str, dict]] = {
        "smoke": dict(n_folds=2, epochs=1, max_steps_per_epoch=2, batch_size=4, n_slices=8, size=32,
                      model="resnet18", sequence_epochs=2),
        "demo": dict(n_folds=2, epochs=3, n_slices=16, size=64, model="resnet10t", slice_labels="all_boxed",
                     lr=2e-4),
        "bench": dict(epochs=25, n_slices=32, size=96),
        "full": dict(),
    }

    model: str = "resnet50"
    lr: float = 5e-4
    n_slices: int = 64
    size: int = 256
    train: str = "slices_then_sequence"
    rotate_shift: bool = True
    sequence_epochs: int = 40
    sequence_lr: float = 1e-3
    slice_labels: str = "vertebrae"
    extra_slices: int = 16

    uses_localisation: ClassVar[bool] = False

    def input_fields(self) -> dict:
        return {"n_slices": self.n_slices, "size": self.size}

    def study_input(self, entry: dict, loc: StudyLocalisation) -> tuple[np.ndarray, dict]:
        """uint8 [N, C, size, size] and its meta (used slices [N], the Otsu crop_box on the cache grid)."""
        meta = entry_meta(entry)
        meta["used"] = study_slices(len(entry["images"]), self.n_slices)
        meta["crop_box"] = crop_box_on_cache(entry)
        return study_sequence(entry["images"], meta["crop_box"], self.n_slices, self.size), meta

    def __post_init__(self):
        if self.slice_labels not in SLICE_LABELS:
            raise ValueError(f"slice_labels must be one of {SLICE_LABELS}, got {self.slice_labels!r}")

    @property
    def wants_extra_slices(self) -> bool:
        """Whether the slice phase learns from labelled slices besides the sampled ones (`extra_slice_choice`)."""
        return self.slices_first and self.slice_labels != "sampled"

    @property
    def labels_from_localisation(self) -> bool:
        """Whether the slice labels need notebook 02's vertebra ranges (only the labels: the input does not)."""
        return self.slices_first and self.slice_labels == "vertebrae"

    def extra_slice_choice(self, labels: np.ndarray) -> np.ndarray:
        """Which slices of a study join the slice phase besides the sampled ones, from its labels of every slice
        float [Z]: at most `extra_slices` unsampled ones, evenly spaced over its fractured slices, then (with
        slice_labels="vertebrae") as many of its healthy ones as fill the rest. int [K], in slice order."""
        unsampled = np.ones(len(labels), bool)
        unsampled[study_slices(len(labels), self.n_slices)] = False
        fractured = _evenly_at_most(np.flatnonzero(unsampled & (labels == 1)), self.extra_slices)
        if self.slice_labels != "vertebrae":
            return fractured
        healthy = _evenly_at_most(np.flatnonzero(unsampled & (labels == 0)), self.extra_slices - len(fractured))
        return np.sort(np.concatenate([fractured, healthy]))

    def extra_slice_input(self, entry: dict, zs: np.ndarray) -> np.ndarray:
        """The slices zs of a study cropped as `study_input` crops: uint8 [K, C, size, size] (K may be 0)."""
        return crop_slices(entry["images"], crop_box_on_cache(entry), np.asarray(zs, int), self.size)

    trains_on_vertebrae: ClassVar[bool] = False
    patient_modes: ClassVar[tuple[str, ...]] = ("head",)
    slice_loss: ClassVar[float] = 0.0

    def image_channels(self, channels: int) -> int:
        return channels

    @property
    def slices_first(self) -> bool:
        return self.train == "slices_then_sequence"


def _evenly_at_most(index: np.ndarray, n: int) -> np.ndarray:
    """index itself when it has at most n items, else n of them evenly spaced (none when n <= 0)."""
    if n <= 0:
        return index[:0]
    return index if len(index) <= n else index[np.unique(evenly_spaced(0, len(index) - 1, n))]


SETTINGS = {"vertebra": VertebraSettings, "study": StudySettings}


def fracture_settings(profile: str, form: str, model: str = "", pretrained_path: str = "",
                      variant: str = "") -> VertebraSettings | StudySettings:
    """The profile's settings of one form; empty model / weights keep the profile's (random initialisation)."""
    if form not in SETTINGS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return SETTINGS[form].for_profile(profile, model=model, pretrained_path=pretrained_path, variant=variant)


def _names(csv: str) -> list[str]:
    return [item.strip() for item in csv.split(",") if item.strip()]


def planned_runs(profile: str, forms: str, models: dict[str, str], pretrained: dict[str, str],
                 extra_vertebra_models: str = "", extra_pretrained: str = "") -> list[tuple[str, StageSettings]]:
    """Notebook 03's models, as (key, settings): each form of the comma-separated `forms` with its backbone and weights
    file (`models`, `pretrained`: form -> timm name, path; empty: the profile's, random initialisation), keyed by form,
    then each extra per-vertebra backbone (comma-separated), keyed by its prediction name, with the weights file at the
    same place in `extra_pretrained` (empty: random initialisation for all)."""
    chosen = _names(forms)
    extra, weights = _names(extra_vertebra_models), _names(extra_pretrained)
    if weights and len(weights) != len(extra):
        raise ValueError(f"{len(weights)} extra weights files for {len(extra)} extra backbones: give one per backbone "
                         f"({extra_pretrained!r} for {extra_vertebra_models!r})")
    if extra and "vertebra" not in chosen:
        raise ValueError(f"extra per-vertebra backbones {extra} given, but the forms {chosen} leave out 'vertebra'")
    runs = [(form, fracture_settings(profile, form, models.get(form, ""), pretrained.get(form, "")))
            for form in chosen]
    for i, model in enumerate(extra):
        settings = fracture_settings(profile, "vertebra", model, weights[i] if weights else "", model)
        runs.append((settings.name, settings))
    return runs

