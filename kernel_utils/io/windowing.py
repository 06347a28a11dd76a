"""CT windows on HU with fixed bounds (never per-slice min/max), the Otsu body crop, and resizing.

Default channels are seed 002's three windows: soft tissue W300/L80, standard bone W1800/L500,
gross bone W650/L400.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Window:
    """A CT window: HU in [level - width/2, level + width/2] maps linearly onto 0..255."""

    name: str
    level: float
    width: float


GROSS_BONE = Window("gross_bone", 400, 650)
SEED002_WINDOWS = (Window("soft_tissue", 80, 300), Window("standard_bone", 500, 1800), GROSS_BONE)


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU array (any shape) -> uint8 of the same shape: clip((hu - low) / width, 0, 1) * 255, rounded."""
    low = level - width / 2.0
    scaled = (hu.astype(np.float32) - low) * (255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def packed_lut(windows: tuple[Window, ...]) -> np.ndarray:
    """A 65536-entry uint32 table: int16 HU + 32768 -> up to four uint8 windows packed little-endian.

    One `np.take` then gives every channel at once; bit-exact with `window` for each channel.
    """
    if not 1 <= len(windows) <= 4:
        raise ValueError(f"1 to 4 windows can be packed, got {len(windows)}")
    hu = np.arange(-32768, 32768, dtype=np.int32)
    lut = np.zeros(hu.shape, dtype=np.uint32)
    for c, w in enumerate(windows):
        lut |= window(hu, w.level, w.width).astype(np.uint32) << np.uint32(8 * c)
    return lut


class SliceWindower:
    """Window then resize one slice at a time: int16 HU [H, W] -> uint8 [out_h, out_w, C].

    The packed table is indexed by the int16 bit pattern (a uint16 view), so no widened copy of the slice
    is made; one table look-up gives every channel, one area resize shrinks them together. Given a file's
    `rescale` (see `kernel_utils.io.dicom_io.Rescale`), the slice may be the stored values as read: the rescale is
    folded into the table (built once per rescale), so no HU slice is ever made. The look-up's output buffer is
    reused from call to call: one windower per thread.
    """

    def __init__(self, windows: tuple[Window, ...] = SEED002_WINDOWS):
        self.n_channels = len(windows)
        self.lut = np.roll(packed_lut(windows), 32768)  # index: int16 HU viewed as uint16
        self._stored_luts: dict = {}
        self._bone_luts: dict = {}
        self._bone_byte = windows.index(GROSS_BONE) if GROSS_BONE in windows else None
        self._packed = np.empty(0, dtype=np.uint32)  # the look-up's output, reused slice after slice

    def stored_lut(self, rescale) -> np.ndarray:
        """The packed table indexed by a stored 16-bit pattern: the windows of rescale's HU of every pattern."""
        if rescale not in self._stored_luts:
            self._stored_luts[rescale] = self.lut[rescale.hu_table().view(np.uint16)]
        return self._stored_luts[rescale]

    def bone_thumbnail(self, hu: np.ndarray, out: np.ndarray, rescale=None, packed: np.ndarray | None = None) -> None:
        """The gross-bone window of every OTSU_STEP-th pixel (the Otsu box's input, `bone_thumbnails` of one slice):
        hu int16 [H, W] (or stored values with their `rescale`) -> out uint8 [ceil(H/S), ceil(W/S)].

        Given the slice's `packed` windows [H, W, 4] and a gross-bone channel among them, a strided copy of that
        channel (a third of the cost of a table look-up)."""
        if packed is not None and self._bone_byte is not None:
            np.copyto(out, packed[::OTSU_STEP, ::OTSU_STEP, self._bone_byte])
            return
        table = self._bone_luts.get(rescale)
        if table is None:  # the gross-bone window of every stored bit pattern
            hu_of_pattern = np.arange(65536, dtype=np.uint16).view(np.int16) if rescale is None else rescale.hu_table()
            table = self._bone_luts[rescale] = bone_window(hu_of_pattern)
        np.take(table, hu[::OTSU_STEP, ::OTSU_STEP].view(np.uint16), out=out)

    def __call__(self, hu: np.ndarray, out_h: int | None = None, out_w: int | None = None,
                 out: np.ndarray | None = None, rescale=None, bone_thumb: np.ndarray | None = None) -> np.ndarray:
        """hu int16 [H, W] (or stored values with their `rescale`) -> uint8 [out_h, out_w, C] (into `out`); with
        `bone_thumb`, its `bone_thumbnail` too."""
        lut = self.lut if rescale is None else self.stored_lut(rescale)
        if self._packed.shape != hu.shape:
            self._packed = np.empty(hu.shape, dtype=np.uint32)
        # every uint16 index is inside the 65536-entry table: mode="wrap" only skips numpy's bounds check,
        # a quarter of the look-up's time
        np.take(lut, np.ascontiguousarray(hu).view(np.uint16), out=self._packed, mode="wrap")
        packed = self._packed.view(np.uint8).reshape(*hu.shape, 4)
        if bone_thumb is not None:
            self.bone_thumbnail(hu, bone_thumb, rescale, packed)
        if out_h and out_w and (out_h, out_w) != hu.shape:
            packed = cv2.resize(packed, (out_w, out_h), interpolation=cv2.INTER_AREA)
        if self.n_channels == 3:  # SIMD channel drop; numpy's strided 4 -> 3 copy costs 1 ms a slice
            return cv2.cvtColor(packed, cv2.COLOR_BGRA2BGR, dst=out)
        if out is not None:
            out[...] = packed[..., : self.n_channels]
            return out
        return np.array(packed[..., : self.n_channels])  # a copy: never the reused buffer


def window_slices(hu: np.ndarray, windows: tuple[Window, ...] = SEED002_WINDOWS) -> np.ndarray:
    """int16 HU [Z, H, W] -> uint8 [Z, H, W, C], one channel per window."""
    windower = SliceWindower(windows)
    return np.stack([windower(np.asarray(s, dtype=np.int16)) for s in hu])


OTSU_STEP = 4  # the Otsu projection is made at quarter resolution: every slice counts, at about 0.01 ms a slice


def bone_window(hu: np.ndarray) -> np.ndarray:
    """HU (any shape) -> uint8: seed 002's gross-bone window (W650/L400), the one its Otsu crop thresholds."""
    return window(hu, GROSS_BONE.level, GROSS_BONE.width)


def bone_thumbnails(hu: np.ndarray) -> np.ndarray:
    """HU [..., H, W] -> uint8 [..., ceil(H/4), ceil(W/4)]: the gross-bone window of every 4th pixel."""
    return bone_window(hu[..., ::OTSU_STEP, ::OTSU_STEP])


def otsu_crop_box(hu: np.ndarray, margin: float = 0.05, square: bool = True) -> tuple[int, int, int, int]:
    """Seed 002's crop: Otsu on the gross-bone window, 5% margin each side, one box for the whole study.

    The mean over every slice of the gross-bone window is thresholded, so bone present on most slices (the
    cervical spine) decides the box, not the skull base or clavicles seen on a few. The mean is an exact
    integer sum, so the box does not depend on the order the slices come in.

    Args:
        hu: int16 [Z, H, W] (or [H, W]).
        margin: fraction of the box size added on each side.
        square: grow the shorter side so the box is square (then resizing keeps the aspect ratio).

    Returns:
        (y0, y1, x0, x1) pixel bounds, end exclusive, inside the image. The whole image when nothing is found.
    """
    if hu.ndim == 2:
        hu = hu[None]
    total = bone_thumbnails(hu).sum(axis=0, dtype=np.uint32)
    return otsu_box(total / len(hu), hu.shape[1:], margin, square)


def otsu_box(projection: np.ndarray, shape: tuple[int, int], margin: float = 0.05,
             square: bool = True) -> tuple[int, int, int, int]:
    """The Otsu box, in pixels of an [H, W] slice, of the mean bone thumbnail [ceil(H/4), ceil(W/4)] of a study."""
    h, w = shape
    bone = np.rint(projection).astype(np.uint8)
    if bone.max() == bone.min():
        return 0, h, 0, w
    _, fg = cv2.threshold(bone, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    ys, xs = np.nonzero(fg)
    if len(ys) == 0:
        return 0, h, 0, w
    s = OTSU_STEP
    y0, y1, x0, x1 = ys.min() * s, min((ys.max() + 1) * s, h), xs.min() * s, min((xs.max() + 1) * s, w)
    my, mx = margin * (y1 - y0), margin * (x1 - x0)
    y0, y1, x0, x1 = y0 - my, y1 + my, x0 - mx, x1 + mx
    if square:
        side = max(y1 - y0, x1 - x0)
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        y0, y1, x0, x1 = cy - side / 2, cy + side / 2, cx - side / 2, cx + side / 2
    y0, x0 = max(int(np.floor(y0)), 0), max(int(np.floor(x0)), 0)
    y1, x1 = min(int(np.ceil(y1)), h), min(int(np.ceil(x1)), w)
    return y0, y1, x0, x1


def resize_slices(images: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """[Z, H, W] or [Z, H, W, C] -> [Z, size, size(, C)]; area interpolation, or for label masks the label at each
    output pixel's centre (cv2's INTER_NEAREST takes the block's first pixel, 1.5 px off the area images at 4x)."""
    if images.shape[1:3] == (size, size):
        return images
    interp = cv2.INTER_NEAREST_EXACT if nearest else cv2.INTER_AREA
    out = np.empty((images.shape[0], size, size, *images.shape[3:]), dtype=images.dtype)
    for k in range(images.shape[0]):
        out[k] = cv2.resize(images[k], (size, size), interpolation=interp).reshape(out.shape[1:])
    return out
