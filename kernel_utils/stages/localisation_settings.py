"""Typed settings of the localisation stage (notebook 02): the per-slice classifier with its BiGRU (seed 000) and
the 3D UNet, with the profile overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kernel_utils.settings import Profiled
from kernel_utils.training import TrainConfig


@dataclass(frozen=True)
class LocalisationSettings(Profiled):
    """Attributes:
        slice_model, pretrained_path, slice_epochs, slice_batch, slice_lr: the per-slice classifier (timm).
        max_steps_per_epoch: cap on training steps per epoch for every model (0: none).
        seg_size, seg_width, seg_epochs, seg_batch, seg_lr: the 3D UNet on seg_size^3 cubes.
        rf_trees, rf_pixels: seed 000's random forest on rf_pixels^2 thumbnails.
    """

    PROFILES: ClassVar[dict[str, dict]] = {
        "smoke": dict(n_folds=2, slice_epochs=1, max_steps_per_epoch=4, seg_size=32, seg_width=8, seg_epochs=2),
        "demo": dict(n_folds=3, slice_epochs=2, seg_size=32, seg_width=8, seg_epochs=25),
        "bench": dict(slice_epochs=4, seg_size=96, seg_width=16, seg_epochs=60),
        "full": dict(),
    }

    n_folds: int = 5
    slice_model: str = "tf_efficientnetv2_b0"
    pretrained_path: str = ""
    slice_epochs: int = 8
    slice_batch: int = 32
    slice_lr: float = 1e-3
    max_steps_per_epoch: int = 0
    seg_size: int = 128
    seg_width: int = 32
    seg_epochs: int = 150
    seg_batch: int = 2
    seg_lr: float = 3e-3
    rf_trees: int = 100
    rf_pixels: int = 16

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
                           params=(("size", self.seg_size), ("width", self.seg_width)))

    @property
    def sequence_cfg(self) -> TrainConfig:
        """The BiGRU over the slice classifier's features; its run name follows the classifier's."""
        return TrainConfig(stage="slice_sequence", model="bigru", epochs=25, batch_size=1, lr=2e-3, patience=6,
                           max_steps_per_epoch=self.max_steps_per_epoch,
                           params=(("features", self.slice_cfg.run_name), ("hidden", 64)))
