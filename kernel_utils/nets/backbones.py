"""timm backbones as the kit uses them (channels_last, no classifier) and pretrained weights from a local file:
`.safetensors`, a timm/Hugging Face cache folder, or a torch state dict read with `weights_only=True`."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file: `.safetensors` (timm's format on the Hugging Face hub), a folder holding
    one (a timm/Hugging Face cache snapshot), or a torch file of tensors (a state dict, or a checkpoint with a
    `model` or `state_dict` entry). Torch files load with `weights_only=True`: a pickle that would run code is
    refused, never executed.

    Raises:
        ValueError: the file is missing, unreadable, or holds something other than tensors; the message names it.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("*.safetensors"))
        if not found:
            raise ValueError(f"{path}: a folder without a .safetensors file")
        path = found[0]
    if not path.exists():
        raise ValueError(f"{path}: pretrained weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise ValueError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any object but tensors and plain containers
        raise ValueError(f"{path}: refused as pretrained weights: not a plain file of tensors "
                         f"({type(e).__name__}: {str(e)[:200]}). Give a .safetensors file or a state dict saved "
                         f"with torch.save(model.state_dict())") from e
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict of tensors")
    return state


def load_pretrained(module: nn.Module, path: str | os.PathLike) -> None:
    """Load a local weights file (`read_weights`), keeping only tensors whose names and shapes match (heads and
    stems may differ)."""
    state = read_weights(path)
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(usable, strict=False)
    log.info("loaded %d of %d tensors from %s", len(usable), len(own), path)
    if not usable:
        raise ValueError(f"{path}: no tensor matches the model's names and shapes")


def _input_as(memory_format: torch.memory_format, module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=memory_format), *args[1:])


def channels_last(model: nn.Module, memory_format: torch.memory_format = torch.channels_last) -> nn.Module:
    """`model` with its weights and every input in `memory_format` (channels_last in 2D, channels_last_3d in 3D):
    the same shapes and state dict, the faster layout for convolutions on these CPUs and on GPUs."""
    model.register_forward_pre_hook(functools.partial(_input_as, memory_format))
    return model.to(memory_format=memory_format)


def timm_backbone(name: str, in_channels: int) -> nn.Module:
    """A timm feature extractor (global pooled features, no classifier); `.pooled_features` says their width (timm's
    `head_hidden_size` where a model has a convolution after the pooling, as MobileNetV3, else `num_features`).

    Weights and inputs are channels_last (NHWC in memory, same shapes and state dict): the faster layout for
    convolutions on these CPUs and on GPUs.
    """
    model = timm.create_model(name, pretrained=False, in_chans=in_channels, num_classes=0)
    model.pooled_features = getattr(model, "head_hidden_size", None) or model.num_features
    return channels_last(model)
