"""Typed settings of the localisation stage (notebook 02): the per-slice classifier with its BiGRU (seed 000) and
the 3D UNet, with the profile overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kernel_utils.settings import Profiled
from kernel_utils.stages.localisation_data import Box, bone_roi
from kernel_utils.training import TrainConfig


@dataclass(frozen=True)
class LocalisationSettings(Profiled):
    """Attributes:
        slice_model, pretrained_path, slice_epochs, slice_batch, slice_lr: the per-slice classifier (timm).
        sequence_epochs: the BiGRU over the slice classifier's features (seed 002's second stage).
        max_steps_per_epoch: cap on training steps per epoch for every model (0: none).
        seg_size, seg_width, seg_epochs, seg_batch, seg_lr: the 3D UNet on seg_size^3 cubes.
        seg_res_units: residual units per level of MONAI's UNet (0: one plain convolution, about 3x faster a step
            on the CPU).
        seg_region: what the cube is cut from in-plane: "frame" (the whole slice) or "bone" (the study's Otsu bone
            box grown by seg_margin of its side on each side, `bone_roi`; the spine then fills more of the cube).
        seg_affine: train the 3D UNet on randomly rotated, scaled and shifted cubes (`random_affine`) besides the
            left-right flip.
        rf_trees, rf_pixels: seed 000's random forest on rf_pixels^2 thumbnails.
    """

    PROFILES: ClassVar[dict[str, dict]] = {
        "smoke": dict(n_folds=2, slice_epochs=1, max_steps_per_epoch=4, seg_size=32, seg_width=8, seg_epochs=2,
                      seg_region="bone"),
        "demo": dict(n_folds=2, slice_epochs=1, sequence_epochs=8, seg_size=48, seg_width=8, seg_epochs=72,
                     seg_region="bone"),
        "bench": dict(slice_epochs=4, seg_size=96, seg_width=16, seg_epochs=60, seg_affine=False),
        "full": dict(),
    }

    n_folds: int = 5
    slice_model: str = "tf_efficientnetv2_b0"
    pretrained_path: str = ""
    slice_epochs: int = 8
    slice_batch: int = 32
    slice_lr: float = 1e-3
    sequence_epochs: int = 25
    max_steps_per_epoch: int = 0
    seg_size: int = 128
    seg_width: int = 32
    seg_epochs: int = 150
    seg_batch: int = 2
    seg_lr: float = 3e-3
    seg_res_units: int = 2
    seg_region: str = "frame"
    seg_margin: float = 0.25
    seg_affine: bool = True
    rf_trees: int = 100
    rf_pixels: int = 16

    def seg_roi(self, entry: dict, cropped: bool = False) -> Box | None:
        """The in-plane box of a cache entry that the 3D UNet's cube is cut from (None: the whole frame)."""
        if self.seg_region not in ("frame", "bone"):
            raise ValueError(f"seg_region must be 'frame' or 'bone', got {self.seg_region!r}")
        return bone_roi(entry, self.seg_margin, cropped) if self.seg_region == "bone" else None

    @property
    def slice_cfg(self) -> TrainConfig:
        return TrainConfig(stage="slice_classifier", model=self.slice_model, epochs=self.slice_epochs,
                           batch_size=self.slice_batch, lr=self.slice_lr, patience=3,
                           max_steps_per_epoch=self.max_steps_per_epoch, pretrained_path=self.pretrained_path)

    @property
    def seg_cfg(self) -> TrainConfig:
        return TrainConfig(stage="seg3d", model="monai_unet", epochs=self.seg_epochs, batch_size=self.seg_batch,
                           lr=self.seg_lr, patience=max(self.seg_epochs // 4, 2),
                           max_steps_per_epoch=self.max_steps_per_epoch,
                           params=(("size", self.seg_size), ("width", self.seg_width))
                           + ((("res_units", self.seg_res_units),) if self.seg_res_units != 2 else ())
                           + ((("region", "bone"), ("margin", self.seg_margin)) if self.seg_region == "bone" else ())
                           + ((("affine", 1),) if self.seg_affine else ()))

    @property
    def sequence_cfg(self) -> TrainConfig:
        """The BiGRU over the slice classifier's features; its run name follows the classifier's."""
        return TrainConfig(stage="slice_sequence", model="bigru", epochs=self.sequence_epochs, batch_size=1, lr=2e-3,
                           patience=6,
                           max_steps_per_epoch=self.max_steps_per_epoch,
                           params=(("features", self.slice_cfg.run_name), ("hidden", 64)))
