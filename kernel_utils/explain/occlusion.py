"""Occlusion sensitivity of a 3D model: how much a logit drops when each block of the volume is blanked."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def occlusion_map(model: nn.Module, volume: np.ndarray, target: int = 7, block: tuple[int, int, int] = (7, 8, 8),
                  batch: int = 16) -> np.ndarray:
    """How much the target's logit drops when each block of the volume is blanked: float [D/b, H/b, W/b]."""
    model.eval()
    dev = next(model.parameters()).device
    x = torch.from_numpy(volume).float()[None].to(dev) / 255.0
    base = float(model(x)[0, target])
    _, d, h, w = volume.shape
    bd, bh, bw = block
    grid = [(i, j, k) for i in range(0, d, bd) for j in range(0, h, bh) for k in range(0, w, bw)]
    drops = np.zeros((len(range(0, d, bd)), len(range(0, h, bh)), len(range(0, w, bw))), dtype=np.float32)
    for start in range(0, len(grid), batch):
        cells = grid[start: start + batch]
        xs = x.repeat(len(cells), 1, 1, 1, 1)
        for n, (i, j, k) in enumerate(cells):
            xs[n, :, i: i + bd, j: j + bh, k: k + bw] = 0
        out = model(xs)[:, target].float().cpu().numpy()
        for n, (i, j, k) in enumerate(cells):
            drops[i // bd, j // bh, k // bw] = base - out[n]
    return drops
