"""Typed settings of a trained stage: one frozen dataclass per stage whose field defaults are the `full` profile,
and per profile a dict of overrides applied with `dataclasses.replace`.

Fields named as `TrainConfig`'s (epochs, batch_size, lr, ...) go to the training loop; `n_folds` and `variant` say
how many models and what they are called; every other field is the stage's own and becomes `TrainConfig.params`
(part of the run name's hash, and what the networks read).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kernel_utils.training import TrainConfig

TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("stage", "params"))
NOT_PARAMS = ("n_folds", "variant")


class Profiled:
    """Base of a settings dataclass with `PROFILES` (profile -> overrides of the defaults)."""

    PROFILES: ClassVar[dict[str, dict]]

    @classmethod
    def for_profile(cls, profile: str, **overrides):
        """The profile's settings; an override that is empty ("" or None) keeps the profile's value."""
        if profile not in cls.PROFILES:
            raise ValueError(f"profile must be one of {sorted(cls.PROFILES)}, got {profile!r}")
        chosen = {k: v for k, v in overrides.items() if v not in ("", None)}
        return dataclasses.replace(cls(), **{**cls.PROFILES[profile], **chosen})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict):
        """Settings written by `to_json`; JSON lists come back as the tuples the defaults are."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                v = data[f.name]
                values[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**values)


class StageSettings(Profiled):
    """Base of one trained model's settings. A subclass sets `stage` (the network registry's key)."""

    stage: ClassVar[str]

    def params(self) -> tuple[tuple[str, object], ...]:
        """The stage's own fields as sorted (name, value) pairs."""
        return tuple(sorted((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                            if f.name not in TRAIN_FIELDS and f.name not in NOT_PARAMS))

    @property
    def cfg(self) -> TrainConfig:
        train = {k: getattr(self, k) for k in TRAIN_FIELDS if hasattr(self, k)}
        return TrainConfig(stage=self.stage, params=self.params(), **train)
