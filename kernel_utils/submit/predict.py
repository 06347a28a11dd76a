"""Inference only, for a Kaggle submission kernel: trained weights in, submission.csv out.

Every test study is preprocessed once through the same cache and loaders, then, one study at a time and in
memory, localised with notebook 02's fold models and predicted by every fold of every model the blend uses
(notebooks 03 and 04, through the stage contract); the predictions are blended with the weights notebook 05 chose
(`predictions/ensemble.json`) and written with the submission writer; a study that cannot be read gets the
training prior. The projected hidden-test time is printed before the long part starts.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kernel_utils.blend.calibration import apply_calibration
from kernel_utils.blend.ensemble import blend
from kernel_utils.blend.prior import predict_constant
from kernel_utils.io.cache import CacheSpec, iter_cached
from kernel_utils.io.cache_build import build_cache
from kernel_utils.io.windowing import Window
from kernel_utils.layout import WorkLayout, layout_of, read_json, write_csv, write_json
from kernel_utils.metric import TARGETS
from kernel_utils.stages.stage import TrainedModel
from kernel_utils.stages.study_localisation import StudyLocalisation
from kernel_utils.stages.vertebra_localiser import Localiser
from kernel_utils.submit.timing import StageTiming
from kernel_utils.submit.writer import write_submission

log = logging.getLogger(__name__)
HIDDEN_TEST_STUDIES = 1500
KAGGLE_LIMIT_HOURS = 9.0


def save_ensemble(work_dir: str | os.PathLike | WorkLayout, names: list[str], weights: np.ndarray, choice: str,
                  prior: dict[str, float], cache: CacheSpec, table: pd.DataFrame | None = None,
                  calibration: np.ndarray | None = None) -> None:
    """`predictions/ensemble.json`: the blend (weights [8, M], and the calibration [8, 2] of `calibration.py` when
    notebook 05 found it helps), its short id `choice`, the prior and the cache; with
    `localisation/localisation.json` and `predictions/<model>.json` it is everything inference needs besides the
    weights files. The out-of-fold comparison table (`ensemble.compare`), when given, goes to
    `predictions/ensemble_table.csv`."""
    layout = layout_of(work_dir)
    if table is not None:
        write_csv(layout.ensemble_table, table.rename_axis("model"), index=True)
    write_json(layout.ensemble_meta, {
        "models": names, "weights": np.asarray(weights).tolist(), "choice": choice, "prior": prior,
        "calibration": None if calibration is None else np.asarray(calibration).tolist(),
        "cache": {"image_size": cache.image_size, "crop": cache.crop, "compress": cache.compress,
                  "windows": [[w.name, w.level, w.width] for w in cache.windows]}})


def ensemble_cache_spec(meta: dict) -> CacheSpec:
    """The cache spec notebook 05 recorded in `predictions/ensemble.json` (what the models were trained on)."""
    c = meta["cache"]
    return CacheSpec(windows=tuple(Window(*w) for w in c["windows"]), image_size=c["image_size"], crop=c["crop"],
                     compress=c["compress"])


def predict_test(data_dir: str | os.PathLike, work_dir: str | os.PathLike, out_path: str | os.PathLike | None = None,
                 workers: int = 2, all_models: bool = False) -> pd.DataFrame:
    """Run the whole inference chain on `data_dir`'s test studies with the weights under `work_dir`.

    A model the blend gives no weight on any label is not run (nor the localisation, when no model runs), unless
    `all_models` (the benchmarks time the full ensemble). Each cache entry is read once for every model.

    Returns:
        The written submission (row_id, fractured); also `work_dir/submission.csv` unless out_path says otherwise.
    """
    layout = layout_of(work_dir)
    meta = read_json(layout.ensemble_meta)
    spec = ensemble_cache_spec(meta)
    test_images = Path(data_dir) / "test_images"
    studies = sorted(p.name for p in test_images.iterdir() if p.is_dir()) if test_images.is_dir() else []
    n = max(len(studies), 1)
    start = time.perf_counter()
    build_cache(data_dir, layout.root, "test", spec, workers=1, uids=studies[:1], progress=False)  # time one study
    per_study_load = time.perf_counter() - start
    print(f"{len(studies)} test studies; loading one took {per_study_load:.2f} s: "
          f"{HIDDEN_TEST_STUDIES} studies would take {HIDDEN_TEST_STUDIES * per_study_load / 3600 / workers:.2f} h "
          f"to load with {workers} workers (limit {KAGGLE_LIMIT_HOURS} h for everything)", flush=True)
    start = time.perf_counter()
    build_cache(data_dir, layout.root, "test", spec, workers=workers)
    timing = StageTiming()
    timing.add("load_and_window", data=time.perf_counter() - start + per_study_load)
    weights = np.asarray(meta["weights"])
    running = [TrainedModel(layout, name) for name, w in zip(meta["models"], weights.sum(axis=0), strict=True)
               if name != "prior" and (all_models or w > 0)]
    probs = {m.name: [] for m in running}
    uids = [] if running else list(studies)  # only the prior: nothing to read
    localiser = None
    if running and any(m.settings.uses_localisation for m in running):
        localiser = Localiser(layout, len(spec.windows), spec.crop)
    entries = timing.timed_stage("read_cache", iter_cached(data_dir, layout.root, spec, ("test",))) if running else []
    for _, uid, entry in tqdm(entries, total=len(studies), desc="test studies"):
        loc = StudyLocalisation()
        if localiser is not None:
            with timing.stage("localise"):
                loc = localiser.localise(uid, entry)
        for m in running:
            with timing.stage(m.name) as clock:
                probs[m.name].append(m.predict(entry, loc, clock))
        uids.append(uid)
    table = timing.per_study(n)
    print("seconds per study by stage (data = reading and cropping the cache, model = networks):")
    print(table.round(4).to_string())
    print(f"data share {timing.data_share():.2f}; {HIDDEN_TEST_STUDIES} studies: "
          f"{HIDDEN_TEST_STUDIES * table.total.sum() / 3600:.2f} h (limit {KAGGLE_LIMIT_HOURS} h)", flush=True)
    write_json(layout.inference_timing, {"studies": len(studies), "per_study_seconds": table.to_dict(orient="index"),
                                         "data_share": timing.data_share(), "projected_hours":
                                         HIDDEN_TEST_STUDIES * float(table.total.sum()) / 3600})
    prior = predict_constant(meta["prior"], uids)
    tests = {name: pd.DataFrame({"StudyInstanceUID": uids, **dict(zip(TARGETS, np.array(p).reshape(-1, 8).T,
                                                                     strict=True))})
             for name, p in probs.items()}
    ordered = [tests.get(name, prior) for name in meta["models"]]  # a model not run has no weight
    final = blend(ordered, weights) if len(ordered) > 1 else ordered[0].copy()
    if meta.get("calibration") is not None:
        final[TARGETS] = apply_calibration(final[TARGETS].to_numpy(float), np.asarray(meta["calibration"]))
    return write_submission(final[["StudyInstanceUID", *TARGETS]], Path(data_dir) / "test.csv",
                            out_path or layout.submission, fallback=meta["prior"])
