"""Vertebra targets and ranges: per-slice presence of C1..C7 from a label volume, slice ranges with the
anatomical consistency rules (C1 above C2 above ... C7, none missing in the middle), in-plane boxes."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)
CERVICAL = tuple(range(1, 8))


def slice_targets(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mask uint8 [Z, H, W] -> (presence bool [Z, 7], fraction float32 [Z, 7]).

    fraction[z, k] is the share of vertebra C(k+1)'s voxels that lie on slice z (each column sums to 1
    where the vertebra exists).
    """
    counts = np.stack([(mask == k).sum(axis=(1, 2)) for k in CERVICAL], axis=1).astype(np.float32)
    totals = counts.sum(axis=0, keepdims=True)
    return counts > 0, np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def ranges_from_presence(presence: np.ndarray) -> dict[int, tuple[int, int] | None]:
    """bool [Z, 7] -> {1..7: (first, last) head-first slice index, or None}; the longest run of each vertebra."""
    out: dict[int, tuple[int, int] | None] = {}
    for j, k in enumerate(CERVICAL):
        idx = np.flatnonzero(presence[:, j])
        if not len(idx):
            out[k] = None
            continue
        runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
        run = max(runs, key=len)
        out[k] = (int(run[0]), int(run[-1]))
    return out


def enforce_order(ranges: dict[int, tuple[int, int] | None]) -> tuple[dict[int, tuple[int, int] | None], list[str]]:
    """Apply the consistency rules; returns the repaired ranges and what was repaired (for the log).

    1. Centres must go down from C1 to C7: a vertebra whose centre lies above its upper neighbour's is dropped.
    2. A vertebra missing between two present ones gets the interpolated range between them.
    """
    ranges = dict(ranges)
    repairs = []
    last_centre = -np.inf
    for k in CERVICAL:
        r = ranges[k]
        if r is None:
            continue
        centre = 0.5 * (r[0] + r[1])
        if centre < last_centre:
            repairs.append(f"C{k} centre {centre:.1f} above C{k - 1}'s: dropped")
            ranges[k] = None
            continue
        last_centre = centre
    present = [k for k in CERVICAL if ranges[k] is not None]
    if len(present) >= 2:
        for k in range(present[0] + 1, present[-1]):
            if ranges[k] is None:
                lo = max(j for j in present if j < k)
                hi = min(j for j in present if j > k)
                t = (k - lo) / (hi - lo)
                a = ranges[lo][1] + t * (ranges[hi][0] - ranges[lo][1])
                half = 0.5 * 0.5 * ((ranges[lo][1] - ranges[lo][0]) + (ranges[hi][1] - ranges[hi][0])) / 2
                ranges[k] = (int(round(a - half)), int(round(a + half)))
                repairs.append(f"C{k} missing between C{lo} and C{hi}: interpolated {ranges[k]}")
    return ranges, repairs


def box_of(mask: np.ndarray, label: int, first: int, last: int) -> tuple[int, int, int, int] | None:
    """In-plane bounding box (y0, y1, x0, x1), end exclusive, of `label` over slices first..last."""
    sub = mask[first: last + 1] == label
    if not sub.any():
        return None
    ys = np.flatnonzero(sub.any(axis=(0, 2)))
    xs = np.flatnonzero(sub.any(axis=(0, 1)))
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
