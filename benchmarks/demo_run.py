"""`make run` as a new user meets it: the five notebooks of a profile from a fresh work folder on its synthetic
dataset, then the run summary (each model against the prior, the blend chosen, the hidden test labels, seconds per
notebook) with the settings every stage ran with, in `benchmarks/results/<profile>_run[_tag].json`.

    python -m benchmarks.demo_run --tag my_change          # fresh run (about 9 minutes on 2 CPU cores)
    python -m benchmarks.demo_run --work-dir DIR --record-only   # record a finished run of DIR instead
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

from benchmarks.common import ROOT, write_result
from kernel_utils.config import get_profile
from kernel_utils.dev.pipeline import run
from kernel_utils.layout import WorkLayout, read_json
from kernel_utils.stages.fracture_settings import StudySettings, VertebraSettings
from kernel_utils.stages.localisation_settings import LocalisationSettings
from kernel_utils.stages.vit import ViTSettings


def profile_settings(profile: str) -> dict:
    """The dataset and every trained stage's settings of a profile, as the notebooks build them."""
    return {"dataset": dataclasses.asdict(get_profile(profile)),
            "localisation": LocalisationSettings.for_profile(profile).to_json(),
            "cnn_lstm_vertebra": VertebraSettings.for_profile(profile).to_json(),
            "cnn_lstm_study": StudySettings.for_profile(profile).to_json(),
            "vit3d": ViTSettings.for_profile(profile).to_json()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--work-dir", default="", help="default: benchmarks/.data/run_<profile> (emptied first)")
    ap.add_argument("--record-only", action="store_true", help="record the run already in --work-dir")
    ap.add_argument("--tag", default="", help="added to the result's name")
    args = ap.parse_args(argv)
    work_dir = Path(args.work_dir or ROOT / ".data" / f"run_{args.profile}").resolve()
    seconds = None
    if not args.record_only:
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        start = time.perf_counter()
        run(None, work_dir, args.profile)
        seconds = time.perf_counter() - start
    summary = read_json(WorkLayout(work_dir).run_summary)
    name = f"{args.profile}_run" + (f"_{args.tag}" if args.tag else "")
    write_result(name, {"what": f"make run ({args.profile} profile) from a fresh WORK_DIR: the run summary",
                        "seconds_with_synthetic_data": seconds, **summary,
                        "settings": profile_settings(args.profile)})


if __name__ == "__main__":
    main()
