"""The localisation networks of notebook 02: seed 000's per-slice vertebra classifier, seed 002's BiGRU over a
study's slice features, and MONAI's 3D UNet."""

from __future__ import annotations

import torch
from torch import nn

from kernel_utils.nets.backbones import channels_last, timm_backbone
from kernel_utils.nets.registry import register
from kernel_utils.training import TrainConfig


class SliceClassifier(nn.Module):
    """Per-slice multi-label classifier: which of C1..C7 a slice shows."""

    def __init__(self, backbone: nn.Module, n_outputs: int = 7):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.pooled_features, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float [B, C, H, W] -> logits [B, n_outputs]."""
        return self.head(self.backbone(x))


@register("slice_classifier")
def _slice_classifier(cfg: TrainConfig, in_channels: int) -> nn.Module:
    return SliceClassifier(timm_backbone(cfg.model, in_channels), 7)


class SliceSequenceHead(nn.Module):
    """Seed 002's second stage, for localisation: a bidirectional GRU over a study's per-slice CNN features, so each
    slice's C1..C7 call sees the slices above and below it (on one axial slice, C3 to C6 look alike).

    forward: x float [B, Z, F] (the slice classifier's pooled features, head first) -> logits [B, Z, 7].
    """

    def __init__(self, n_features: int, hidden: int = 64, dropout: float = 0.2, n_outputs: int = 7):
        super().__init__()
        self.project = nn.Sequential(nn.Dropout(dropout), nn.Linear(n_features, hidden), nn.ReLU())
        self.gru = nn.GRU(hidden, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, _ = self.gru(self.project(x))
        return self.head(seq)


@register("slice_sequence")
def _slice_sequence(cfg: TrainConfig, in_channels: int) -> nn.Module:
    return SliceSequenceHead(in_channels, int(cfg.param("hidden", 64)))


@register("seg3d")
def _seg3d(cfg: TrainConfig, in_channels: int) -> nn.Module:
    """MONAI's 3D UNet: [B, C, D, D, D] -> logits [B, 8, D, D, D]. Weights and inputs are channels_last_3d (same
    shapes and state dict), the faster layout for its convolutions (`benchmarks/unet_speed.py`)."""
    from monai.networks.nets import UNet

    width = int(cfg.param("width", 16))
    model = UNet(spatial_dims=3, in_channels=in_channels, out_channels=8,
                 channels=(width, 2 * width, 4 * width, 8 * width), strides=(2, 2, 2),
                 num_res_units=int(cfg.param("res_units", 2)))
    return channels_last(model, torch.channels_last_3d)
