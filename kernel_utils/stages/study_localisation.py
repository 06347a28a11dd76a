"""What the fracture models take from notebook 02 for one study: its rows of `vertebrae.csv` and its vertebra mask.

At training time they come from the work folder (`LocalisationTable`); at test inference straight from the
localisation models, in memory, one study at a time.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kernel_utils.layout import WorkLayout

log = logging.getLogger(__name__)


@dataclass
class StudyLocalisation:
    """rows: the study's rows of `vertebrae.csv` (vertebra, found, first, last, y0, y1, x0, x1) or None (not
    localised: every model falls back to seven even windows); mask: uint8 [Z, S, S] labels on the cache grid, or
    None; mask_path: where the mask is read from when it is needed (training)."""

    rows: pd.DataFrame | None = None
    mask: np.ndarray | None = None
    mask_path: Path | None = None

    def load_mask(self) -> np.ndarray | None:
        if self.mask is None and self.mask_path is not None and self.mask_path.exists():
            with np.load(self.mask_path, allow_pickle=False) as f:
                self.mask = f["mask"]
        return self.mask

    def fingerprint(self) -> str:
        """Changes when notebook 02 writes another localisation of the study (rows or mask file)."""
        h = hashlib.sha1(b"" if self.rows is None else self.rows.to_csv(index=False).encode())
        if self.mask_path is not None and self.mask_path.exists():
            st = self.mask_path.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        elif self.mask is not None:
            h.update(hashlib.sha1(np.ascontiguousarray(self.mask)).digest())
        return h.hexdigest()[:16]


class LocalisationTable:
    """Notebook 02's outputs in a work folder, read once: `for_study(uid)` gives a StudyLocalisation."""

    def __init__(self, layout: WorkLayout):
        self.layout = layout
        self.table = pd.read_csv(layout.vertebrae) if layout.vertebrae.exists() else None
        self.by_uid = dict(tuple(self.table.groupby("StudyInstanceUID"))) if self.table is not None else {}

    @property
    def found(self) -> bool:
        return self.table is not None

    def for_study(self, uid: str) -> StudyLocalisation:
        rows = self.by_uid.get(uid)
        return StudyLocalisation(None if rows is None else rows.reset_index(drop=True), None, self.layout.mask(uid))
