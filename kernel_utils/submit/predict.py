"""Inference only, for a Kaggle submission kernel: trained weights in, submission.csv out.

Every test study is preprocessed once through the same cache and loaders, localised with the fold models of
notebook 02, predicted by every fold of every model of notebooks 03 and 04, blended with the weights notebook 05
chose (`predictions/ensemble.json`), and written with the submission writer; a study that cannot be read gets the
training prior. The projected hidden-test time is printed before the long part starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kernel_utils.blend.calibration import apply_calibration
from kernel_utils.blend.ensemble import blend
from kernel_utils.io.cache import CacheSpec, iter_cached
from kernel_utils.io.cache_build import build_cache
from kernel_utils.metric import TARGETS
from kernel_utils.stages.fracture import FractureSettings, build_inputs, load_fold_models, predict_fracture
from kernel_utils.stages.localisation import LocalisationSettings, load_localisation_models, localise_all
from kernel_utils.stages.vit import ViTSettings, build_volumes
from kernel_utils.submit.writer import write_submission
from kernel_utils.training import TrainConfig

log = logging.getLogger(__name__)
HIDDEN_TEST_STUDIES = 1500
KAGGLE_LIMIT_HOURS = 9.0


def save_ensemble(work_dir: str | os.PathLike, names: list[str], weights: np.ndarray, choice: str,
                  prior: dict[str, float], cache: CacheSpec, table: pd.DataFrame | None = None,
                  calibration: np.ndarray | None = None) -> Path:
    """`predictions/ensemble.json`: the blend (weights [8, M], and the calibration [8, 2] of `calibration.py` when
    notebook 05 found it helps), the prior and the cache; with `localisation/localisation.json` and
    `predictions/<model>.json` it is everything inference needs besides the weights files. The out-of-fold
    comparison table (`ensemble.compare`), when given, goes to `predictions/ensemble_table.csv`."""
    path = Path(work_dir) / "predictions" / "ensemble.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if table is not None:
        table.rename_axis("model").to_csv(path.with_name("ensemble_table.csv"))
    path.write_text(json.dumps({
        "models": names, "weights": np.asarray(weights).tolist(), "choice": choice, "prior": prior,
        "calibration": None if calibration is None else np.asarray(calibration).tolist(),
        "cache": {"image_size": cache.image_size, "crop": cache.crop, "compress": cache.compress,
                  "windows": [[w.name, w.level, w.width] for w in cache.windows]}}, indent=1))
    return path


def ensemble_cache_spec(meta: dict) -> CacheSpec:
    """The cache spec notebook 05 recorded in `predictions/ensemble.json` (what the models were trained on)."""
    from kernel_utils.io.windowing import Window

    c = meta["cache"]
    return CacheSpec(windows=tuple(Window(*w) for w in c["windows"]), image_size=c["image_size"], crop=c["crop"],
                     compress=c["compress"])


def _model_settings(meta: dict):
    cfg = TrainConfig.from_json(meta["config"])
    if meta["form"] == "vit":
        return ViTSettings(cfg, meta["n_folds"])
    return FractureSettings(meta["form"], cfg, meta["n_folds"], meta.get("variant", ""))


def predict_test(data_dir: str | os.PathLike, work_dir: str | os.PathLike, out_path: str | os.PathLike | None = None,
                 workers: int = 2, all_models: bool = False) -> pd.DataFrame:
    """Run the whole inference chain on `data_dir`'s test studies with the weights under `work_dir`.

    A model the blend gives no weight on any label is not run (nor the localisation, when no model runs), unless
    `all_models` (the benchmarks time the full ensemble).

    Returns:
        The written submission (row_id, fractured); also `work_dir/submission.csv` unless out_path says otherwise.
    """
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    meta = json.loads((work_dir / "predictions" / "ensemble.json").read_text())
    spec = ensemble_cache_spec(meta)
    studies = sorted(p.name for p in (data_dir / "test_images").iterdir() if p.is_dir()) \
        if (data_dir / "test_images").is_dir() else []
    n = max(len(studies), 1)
    start = time.perf_counter()
    build_cache(data_dir, work_dir, "test", spec, workers=1, uids=studies[:1], progress=False)  # time one study
    per_study_load = time.perf_counter() - start
    print(f"{len(studies)} test studies; loading one took {per_study_load:.2f} s: "
          f"{HIDDEN_TEST_STUDIES} studies would take {HIDDEN_TEST_STUDIES * per_study_load / 3600 / workers:.2f} h "
          f"to load with {workers} workers (limit {KAGGLE_LIMIT_HOURS} h for everything)", flush=True)
    start = time.perf_counter()
    build_cache(data_dir, work_dir, "test", spec, workers=workers)
    timing = StageTiming()
    timing.add("load_and_window", data=time.perf_counter() - start + per_study_load)
    weights = np.asarray(meta["weights"])
    running = [name for name, w in zip(meta["models"], weights.sum(axis=0), strict=True)
               if name != "prior" and (all_models or w > 0)]
    if running:
        _localise_test(data_dir, work_dir, spec, timing)
    tests = {}
    for name in running:
        model_meta = json.loads((work_dir / "predictions" / f"{name}.json").read_text())
        settings = _model_settings(model_meta)
        with timing.stage(name) as clock:
            with clock.data():
                if settings.form == "vit":
                    uids, inputs = build_volumes(data_dir, work_dir, spec, settings, "test")
                    folder = work_dir / "models" / "vit"
                else:
                    uids, inputs, _ = build_inputs(data_dir, work_dir, spec, settings, "test")
                    folder = work_dir / "models" / "fracture"
            models = load_fold_models(settings, _channels(settings, inputs), folder, settings.n_folds)
            tests[name] = predict_fracture(models, uids, inputs, settings, model_meta.get("patient_mode", "head"))
    table = timing.per_study(n)
    print("seconds per study by stage (data = reading and cropping the cache, model = networks):")
    print(table.round(4).to_string())
    print(f"data share {timing.data_share():.2f}; {HIDDEN_TEST_STUDIES} studies: "
          f"{HIDDEN_TEST_STUDIES * table.total.sum() / 3600:.2f} h (limit {KAGGLE_LIMIT_HOURS} h)", flush=True)
    timing_path = work_dir / "predictions" / "inference_timing.json"
    timing_path.write_text(json.dumps({"studies": len(studies), "per_study_seconds": table.to_dict(orient="index"),
                                       "data_share": timing.data_share(), "projected_hours":
                                       HIDDEN_TEST_STUDIES * float(table.total.sum()) / 3600}, indent=1))
    uids = next(iter(tests.values())).StudyInstanceUID if tests else pd.Series(studies)
    from kernel_utils.blend.prior import predict_constant

    prior = predict_constant(meta["prior"], uids)
    ordered = [tests.get(n, prior) for n in meta["models"]]  # a model not run has no weight
    final = blend(ordered, np.asarray(meta["weights"])) if len(ordered) > 1 else ordered[0].copy()
    if meta.get("calibration") is not None:
        final[TARGETS] = apply_calibration(final[TARGETS].to_numpy(float), np.asarray(meta["calibration"]))
    return write_submission(final[["StudyInstanceUID", *TARGETS]], data_dir / "test.csv",
                            out_path or work_dir / "submission.csv", fallback=meta["prior"])


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

    def per_study(self, n_studies: int) -> pd.DataFrame:
        """Columns data, model, total: seconds per study of each stage."""
        rows = {k: {"data": c.data_seconds / n_studies, "model": (c.total_seconds - c.data_seconds) / n_studies,
                    "total": c.total_seconds / n_studies} for k, c in self.stages.items()}
        return pd.DataFrame.from_dict(rows, orient="index")

    def data_share(self) -> float:
        total = sum(c.total_seconds for c in self.stages.values())
        return sum(c.data_seconds for c in self.stages.values()) / total if total else 0.0


def _localise_test(data_dir: Path, work_dir: Path, spec: CacheSpec, timing: StageTiming) -> None:
    """Notebook 02's fold models on every test study, merged beside the training localisation."""
    loc = json.loads((work_dir / "localisation" / "localisation.json").read_text())
    loc_settings = LocalisationSettings(loc["n_folds"], TrainConfig.from_json(loc["slice_cfg"]),
                                        TrainConfig.from_json(loc["seg_cfg"]), loc["seg_size"])
    models_dir = work_dir / "localisation" / "models"
    channels = len(spec.windows)
    with timing.stage("localise") as clock:
        unets, slice_models = load_localisation_models(loc_settings, models_dir, channels, loc["n_folds"])
        localise_all(clock.timed_data(iter_cached(data_dir, work_dir, spec, ("test",))), unets, slice_models, {},
                     loc_settings, work_dir / "localisation_test", crop=spec.crop,
                     range_source=loc.get("range_source", "unet3d"))
    _merge_localisation(work_dir)


def _channels(settings, inputs) -> int:
    from kernel_utils.stages.fracture import in_channels

    return in_channels(settings, inputs)


def _merge_localisation(work_dir: Path) -> None:
    """Put the test localisation beside the training one, where build_inputs and build_volumes look."""
    test_dir, main = work_dir / "localisation_test", work_dir / "localisation"
    (main / "masks").mkdir(parents=True, exist_ok=True)
    for mask in (test_dir / "masks").glob("*.npz"):
        os.replace(mask, main / "masks" / mask.name)
    rows = pd.read_csv(test_dir / "vertebrae.csv")
    table = main / "vertebrae.csv"
    if table.exists():
        old = pd.read_csv(table)
        rows = pd.concat([old[~old.StudyInstanceUID.isin(rows.StudyInstanceUID)], rows], ignore_index=True)
    rows.to_csv(table, index=False)
