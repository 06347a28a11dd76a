"""2.5D CNN + BiLSTM fracture models (seed 002's study-level form, the winners' per-vertebra form) and the
competition-weighted loss.

Per-vertebra: x [B, 7, N, C, H, W] (7 vertebrae, N slices each, C = neighbouring slices + mask) ->
logits [B, 8] (C1..C7, then a patient head); trained on single vertebrae, x [B, N, C, H, W] -> logits [B, 1]
(with a per-slice logit of each slice where boxes say which slices hold the fracture), then the patient head on
the frozen vertebra features. Study-level: x [B, N, C, H, W] -> logits [B, 8].
"""

from __future__ import annotations

import torch
from torch import nn

from kernel_utils.nets.backbones import timm_backbone
from kernel_utils.nets.registry import register
from kernel_utils.training import TrainConfig

POSITIVE_WEIGHTS = torch.tensor([2.0] * 7 + [14.0])
NEGATIVE_WEIGHTS = torch.tensor([1.0] * 7 + [7.0])


def competition_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The competition metric as a loss: weighted BCE over C1..C7 + patient_overall, each study's weighted
    sum over its weight sum, then the mean over studies. logits, target float [B, 8]."""
    logits, target = logits.float(), target.float()
    w = torch.where(target > 0.5, POSITIVE_WEIGHTS.to(logits.device), NEGATIVE_WEIGHTS.to(logits.device))
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return ((bce * w).sum(dim=1) / w.sum(dim=1)).mean()


def batch_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return competition_bce(logits, batch["target"])


def vertebra_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The metric's vertebra weights (2 positive, 1 negative) over a batch of single vertebrae: the weighted BCE
    summed over the batch over the weight sum. logits, target float [B, 1]."""
    logits, target = logits.float(), target.float()
    w = torch.where(target > 0.5, POSITIVE_WEIGHTS[0], NEGATIVE_WEIGHTS[0]).to(logits.device)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * w).sum() / w.sum()


def vertebra_batch_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return vertebra_bce(logits, batch["target"])


def masked_slice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the slices whose label is known (nan: unknown); 0 when none is. logits, target [B, N]."""
    known = ~torch.isnan(target)
    if not known.any():
        return logits.sum() * 0.0  # keeps the graph: every step backpropagates the same way
    return nn.functional.binary_cross_entropy_with_logits(logits.float()[known], target.float()[known])


def vertebra_slice_loss(logits: torch.Tensor, batch: dict, slice_weight: float = 1.0) -> torch.Tensor:
    """Single-vertebra loss with the per-slice auxiliary term: logits [B, 1 + N] (`vertebra_and_slice_logits`),
    batch target [B, 1] and, when the dataset has them, slice_target [B, N] (nan where unknown). Without slice
    targets (validation) it is `vertebra_bce` of the vertebra logit alone."""
    loss = vertebra_bce(logits[:, :1], batch["target"])
    if "slice_target" in batch:
        loss = loss + slice_weight * masked_slice_bce(logits[:, 1:], batch["slice_target"])
    return loss


class SequenceEncoder(nn.Module):
    """A timm CNN on every slice, then a bidirectional LSTM over the slices, mean- and max-pooled.

    forward: x [B, N, C, H, W] -> features [B, 4 * hidden].
    """

    def __init__(self, backbone: nn.Module, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.lstm = nn.LSTM(backbone.pooled_features, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.out_features = 4 * hidden
        self.backbone_frozen = False

    def freeze_backbone(self) -> None:
        """Seed 002's second phase: the CNN stays as trained on slices (no gradient, batch norm in eval mode)."""
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> SequenceEncoder:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def slice_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, C, H, W] -> per-slice CNN features [B, N, F]."""
        b, n = x.shape[:2]
        return self.backbone(x.flatten(0, 1)).view(b, n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, C, H, W] -> (pooled features [B, 4 * hidden], per-slice CNN features [B, N, F])."""
        slices = self.slice_features(x)
        return self.pool(slices), slices

    def pool(self, slices: torch.Tensor) -> torch.Tensor:
        """Per-slice CNN features [B, N, F] -> the BiLSTM's mean- and max-pooled outputs [B, 4 * hidden]."""
        seq, _ = self.lstm(self.dropout(slices))  # [B, N, 2 * hidden]
        return torch.cat([seq.mean(dim=1), seq.amax(dim=1)], dim=1)


class VertebraCnnLstm(nn.Module):
    """Per-vertebra model: the same encoder on each vertebra's slice sequence, one logit per vertebra, and a
    patient head over the seven vertebra features.

    forward: x [B, 7, N, C, H, W] -> logits [B, 8] (C1..C7, patient_overall); one vertebra's sequence
    x [B, N, C, H, W] -> its logit [B, 1] (how it is trained: seven times the samples of whole studies);
    `vertebra_and_slice_logits` adds a logit per slice from the CNN features alone (the auxiliary target).
    """

    def __init__(self, encoder: SequenceEncoder):
        super().__init__()
        self.encoder = encoder
        self.vertebra_head = nn.Linear(encoder.out_features, 1)
        self.patient_head = nn.Sequential(nn.Linear(2 * encoder.out_features, 64), nn.ReLU(), nn.Linear(64, 1))
        self.slice_head = nn.Linear(encoder.backbone.pooled_features, 1)

    def vertebra_and_slice_logits(self, x: torch.Tensor) -> torch.Tensor:
        """One vertebra's sequence x [B, N, C, H, W] -> [B, 1 + N]: its logit, then one logit per slice."""
        pooled, slices = self.encoder.encode(x)
        return torch.cat([self.vertebra_head(pooled), self.slice_head(slices).squeeze(-1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            return self.vertebra_head(self.encoder(x))
        feats = self.vertebra_features(x)
        return torch.cat([self.vertebra_head(feats).squeeze(-1), self.patient_logit(feats)], dim=1)

    def vertebra_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 7, N, C, H, W] -> encoder features [B, 7, F]."""
        b, v = x.shape[:2]
        return self.encoder(x.flatten(0, 1)).view(b, v, -1)

    def patient_logit(self, feats: torch.Tensor) -> torch.Tensor:
        """Vertebra features [B, 7, F] -> patient_overall logit [B, 1]."""
        return self.patient_head(torch.cat([feats.mean(dim=1), feats.amax(dim=1)], dim=1))


class SliceFracture(nn.Module):
    """Seed 002's first phase: the study model's CNN with a one-logit head, trained on single slices with
    image-level labels; it shares the backbone module (`StudyCnnLstm.slice_model`), so training it trains the
    study model's CNN.

    forward: x [B, C, H, W] -> logits [B, 1].
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.pooled_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class StudyCnnLstm(nn.Module):
    """Seed 002's study-level model: every (sampled) slice through the CNN, a BiLSTM, eight logits.

    forward: x [B, N, C, H, W] -> logits [B, 8].
    """

    def __init__(self, encoder: SequenceEncoder):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_features, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def slice_model(self) -> SliceFracture:
        """The first phase's model, sharing this model's CNN."""
        return SliceFracture(self.encoder.backbone)


class SequenceOnFeatures(nn.Module):
    """Seed 002's second phase on frozen features: the study model's BiLSTM and head over per-slice CNN features,
    sharing their modules with the model, so training it trains them (the frozen CNN is not run).

    forward: features [B, N, F] -> logits [B, 8].
    """

    def __init__(self, model: StudyCnnLstm):
        super().__init__()
        self.encoder, self.head = model.encoder, model.head

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.pool(feats))


@register("cnn_lstm_vertebra")
def _vertebra(cfg: TrainConfig, in_channels: int) -> nn.Module:
    enc = SequenceEncoder(timm_backbone(cfg.model, in_channels), int(cfg.param("hidden", 128)))
    return VertebraCnnLstm(enc)


@register("cnn_lstm_study")
def _study(cfg: TrainConfig, in_channels: int) -> nn.Module:
    enc = SequenceEncoder(timm_backbone(cfg.model, in_channels), int(cfg.param("hidden", 128)))
    return StudyCnnLstm(enc)


def patient_from_vertebrae(p_vertebrae: torch.Tensor) -> torch.Tensor:
    """patient_overall as 1 - prod(1 - p_Ck): p [..., 7] -> [...]."""
    return 1 - torch.prod(1 - p_vertebrae, dim=-1)
