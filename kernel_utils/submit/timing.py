"""Wall seconds of each inference stage per study, split into data (reading and cropping the cache) and model."""

from __future__ import annotations

import contextlib
import time

import pandas as pd


class _StageClock:
    """Seconds of one stage, split into data (reading and cropping the cache) and the rest (the networks)."""

    def __init__(self):
        self.data_seconds = 0.0
        self.total_seconds = 0.0

    @contextlib.contextmanager
    def data(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.data_seconds += time.perf_counter() - start

    def timed_data(self, iterable):
        """Yield from iterable, counting the time spent producing each item as data time."""
        it = iter(iterable)
        while True:
            with self.data():
                item = next(it, _END)
            if item is _END:
                return
            yield item


_END = object()


class StageTiming:
    """Wall seconds per inference stage, data and model apart."""

    def __init__(self):
        self.stages: dict[str, _StageClock] = {}

    def add(self, name: str, data: float = 0.0, model: float = 0.0) -> None:
        clock = self.stages.setdefault(name, _StageClock())
        clock.data_seconds += data
        clock.total_seconds += data + model

    @contextlib.contextmanager
    def stage(self, name: str):
        clock = self.stages.setdefault(name, _StageClock())
        start = time.perf_counter()
        try:
            yield clock
        finally:
            clock.total_seconds += time.perf_counter() - start

    def timed_stage(self, name: str, iterable):
        """Yield from iterable; producing each item is all of stage `name`, counted as its data time."""
        it = iter(iterable)
        while True:
            with self.stage(name) as clock, clock.data():
                item = next(it, _END)
            if item is _END:
                return
            yield item

    def per_study(self, n_studies: int) -> pd.DataFrame:
        """Columns data, model, total: seconds per study of each stage."""
        rows = {k: {"data": c.data_seconds / n_studies, "model": (c.total_seconds - c.data_seconds) / n_studies,
                    "total": c.total_seconds / n_studies} for k, c in self.stages.items()}
        return pd.DataFrame.from_dict(rows, orient="index")

    def data_share(self) -> float:
        total = sum(c.total_seconds for c in self.stages.values())
        return sum(c.data_seconds for c in self.stages.values()) / total if total else 0.0
