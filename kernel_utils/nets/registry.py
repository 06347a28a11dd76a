"""The registry of the kit's networks: `register(stage)` adds a builder, `create_model(cfg, in_channels)` builds one.

It imports none of the networks: `kernel_utils.nets` imports them, and they register themselves here.
Pretrained weights come only from a local file (a Kaggle dataset): nothing is downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from kernel_utils.nets.backbones import load_pretrained
from kernel_utils.training import TrainConfig

log = logging.getLogger(__name__)
REGISTRY: dict[str, Callable[[TrainConfig, int], nn.Module]] = {}


def register(stage: str):
    def wrap(fn):
        REGISTRY[stage] = fn
        return fn

    return wrap


def create_model(cfg: TrainConfig, in_channels: int) -> nn.Module:
    """The network of `cfg.stage`, with `cfg.pretrained_path` loaded into its backbone when given."""
    if cfg.stage not in REGISTRY:
        raise ValueError(f"unknown stage {cfg.stage!r}; registered: {sorted(REGISTRY)}")
    model = REGISTRY[cfg.stage](cfg, in_channels)
    if cfg.pretrained_path:
        backbones = [m for name, m in model.named_modules() if name.split(".")[-1] == "backbone"]
        load_pretrained(backbones[0] if backbones else model, cfg.pretrained_path)
    return model
