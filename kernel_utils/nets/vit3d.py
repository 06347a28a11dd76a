"""The 3D Vision Transformer of notebook 04 (seed 004): MONAI's ViT with a CLS token, after an optional convolutional
stem, over the whole volume or each vertebra's block on its own."""

from __future__ import annotations

import torch
from torch import nn

from kernel_utils.nets.registry import register
from kernel_utils.training import TrainConfig


def conv_stem(in_channels: int, channels: tuple[int, ...]) -> nn.Module:
    """Convolutions that halve the in-plane size each (the first in-plane only, the others 3x3x3), BatchNorm, ReLU:
    [B, C, D, H, W] -> [B, channels[-1], D, H / 2^n, W / 2^n]. Empty: identity."""
    layers, c = [], in_channels
    for i, out in enumerate(channels):
        kernel, pad = ((1, 3, 3), (0, 1, 1)) if i == 0 else ((3, 3, 3), (1, 1, 1))
        layers += [nn.Conv3d(c, out, kernel, stride=(1, 2, 2), padding=pad, bias=False), nn.BatchNorm3d(out),
                   nn.ReLU(inplace=True)]
        c = out
    return nn.Sequential(*layers)


class ViTClassifier(nn.Module):
    """MONAI's ViT with a CLS token, after an optional convolutional stem, in one of two encodings.

    `encode="volume"` (seed 004): one ViT over the whole volume, a linear head of eight logits from its CLS token.
    `encode="vertebra"`: the volume is the seven vertebrae's blocks of D / 7 slices, and the same ViT encodes each
    block on its own: a linear head gives each vertebra its logit from that block's CLS token, and a small head
    over the seven CLS tokens (mean and max) gives patient_overall. Each label then belongs to its own tokens
    (48 instead of 336 at bench size), the way the per-vertebra CNN sees it. With `train_on="vertebrae"` (the
    default) it trains like the per-vertebra CNN: on single blocks x [B, C, D / 7, H, W] -> [B, 1], then the
    patient head on the frozen features.

    Seed 004 embeds raw patches of the whole volume; on the bench set that ViT stayed at chance (mean vertebra AUC
    0.48-0.50 out of fold) while a small 3D CNN reached 0.98 on the same vertebra crops: a thin fracture line is a
    poor fit for one linear map of a 16x16 patch. Two stride-2 convolutions first (Xiao et al. 2021, "Early
    convolutions help transformers see better") took one vertebra's AUC from 0.69 to 0.84 in 400 steps. `patch` is
    in input voxels either way, so the token grid is the same; `stem=()` is seed 004's plain patch embedding.

    forward: x [B, C, D, H, W] -> logits [B, 8].
    """

    def __init__(self, in_channels: int, img_size: tuple[int, int, int], patch: tuple[int, int, int], hidden: int,
                 layers: int, heads: int, dropout: float, stem: tuple[int, ...] = (), encode: str = "volume"):
        super().__init__()
        from monai.networks.nets import ViT

        if encode not in ("volume", "vertebra"):
            raise ValueError(f"ViT encode must be 'volume' or 'vertebra', not {encode!r}")
        depth = img_size[0] // 7 if encode == "vertebra" else img_size[0]
        if encode == "vertebra" and img_size[0] % 7:
            raise ValueError(f"ViT depth {img_size[0]} must be seven vertebra blocks to encode each vertebra")
        scale = 2 ** len(stem)
        if img_size[1] % scale or img_size[2] % scale or patch[1] % scale or patch[2] % scale:
            raise ValueError(f"ViT size {img_size[1:]} and patch {patch[1:]} must be multiples of {scale} "
                             f"for a stem of {len(stem)} stride-2 convolutions")
        self.encode, self.block_depth = encode, depth if encode == "vertebra" else None
        self.stem = conv_stem(in_channels, tuple(stem))
        self.vit = ViT(in_channels=stem[-1] if stem else in_channels,
                       img_size=(depth, img_size[1] // scale, img_size[2] // scale),
                       patch_size=(patch[0], patch[1] // scale, patch[2] // scale), hidden_size=hidden,
                       mlp_dim=4 * hidden, num_layers=layers, num_heads=heads, proj_type="conv",
                       classification=True, num_classes=1 if encode == "vertebra" else 8, dropout_rate=dropout,
                       post_activation=None, spatial_dims=3)
        if encode == "vertebra":
            self.patient_head = nn.Sequential(nn.Linear(2 * hidden, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encode == "volume" or x.shape[2] == self.block_depth:
            return self.vit(self.stem(x))[0]  # the volume's 8 logits, or one vertebra's block: its logit [B, 1]
        feats = self.vertebra_features(x)
        return torch.cat([self.vit.classification_head(feats).squeeze(-1), self.patient_logit(feats)], dim=1)

    def vertebra_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, 7 * d, H, W] -> each vertebra block's normed CLS token [B, 7, hidden]."""
        b, c, d, h, w = x.shape
        blocks = x.view(b, c, 7, d // 7, h, w).transpose(1, 2).flatten(0, 1)  # [B * 7, C, d, H, W]
        _, hidden_states = self.vit(self.stem(blocks))
        return self.vit.norm(hidden_states[-1][:, 0]).view(b, 7, -1)

    def patient_logit(self, feats: torch.Tensor) -> torch.Tensor:
        """Vertebra features [B, 7, hidden] -> patient_overall logit [B, 1]."""
        return self.patient_head(torch.cat([feats.mean(dim=1), feats.amax(dim=1)], dim=1))


@register("vit3d")
def _vit(cfg: TrainConfig, in_channels: int) -> nn.Module:
    p = dict(cfg.params)
    depth = 7 * len(range(0, p["slices_per_vertebra"], p["keep_every"]))
    if p.get("encode") == "vertebra" and p["volume"] != "vertebrae":
        raise ValueError("encode='vertebra' needs the vertebra volume (volume='vertebrae'), not the whole study")
    return ViTClassifier(in_channels, (depth, p["size"], p["size"]), tuple(p["patch"]), p["hidden"], p["layers"],
                         p["heads"], p["dropout"], tuple(p.get("stem", ())),
                         p.get("encode", "volume"))
