"""Peak memory of notebook 03's training at two dataset sizes: inputs read study by study from the input store
(what the kit does) against the same inputs held in a list (what it did before).

Each run is a fresh process (`train_and_predict` of the per-vertebra form at the `full` profile's input size, 15
slices x 4 channels x 128^2 per vertebra, with a tiny backbone and two training steps per fold, so the inputs and
not the network dominate), on subsets of the bench profile's synthetic studies; peak RSS from getrusage; under
`make run`'s glibc allocator setting and with every allocation over 1 MB mapped on its own.

    python -m benchmarks.training_memory [--sizes 30,120]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import ROOT, prepared_data, write_result

# glibc's threshold above which an allocation is its own mapping: make run's (the Makefile's, for the cache build),
# and 1 MB, where every input array is returned to the system when freed instead of staying in the heap
ALLOCATORS = {"make_run": "67108864", "mmap_1mb": "1048576"}


def subset(data_dir: Path, bench_work: Path, n: int) -> tuple[Path, Path]:
    """(data_dir, work_dir) with the first n train and 4 test studies of the bench set (links, not copies) and its
    cache."""
    root = ROOT / ".data" / f"memory_{n}"
    data, work = root / "data", root / "work"
    shutil.rmtree(root, ignore_errors=True)
    (data / "train_images").mkdir(parents=True)
    work.mkdir(parents=True)
    train = pd.read_csv(data_dir / "train.csv").sort_values("StudyInstanceUID").head(n)
    train.to_csv(data / "train.csv", index=False)
    boxes = pd.read_csv(data_dir / "train_bounding_boxes.csv")
    boxes[boxes.StudyInstanceUID.isin(train.StudyInstanceUID)].to_csv(data / "train_bounding_boxes.csv", index=False)
    for uid in train.StudyInstanceUID:
        (data / "train_images" / uid).symlink_to(data_dir / "train_images" / uid)
    test = sorted(p.name for p in (data_dir / "test_images").iterdir())[:4]  # test inference is not what is measured
    (data / "test_images").mkdir()
    for uid in test:
        (data / "test_images" / uid).symlink_to(data_dir / "test_images" / uid)
    pd.read_csv(data_dir / "test.csv").query("StudyInstanceUID in @test").to_csv(data / "test.csv", index=False)
    (data / "segmentations").symlink_to(data_dir / "segmentations")
    (work / "cache").symlink_to(bench_work / "cache")
    return data, work


def child(data_dir: str, work_dir: str, eager: bool) -> dict:
    """One training run in this process; returns its peak RSS and seconds."""
    from kernel_utils.io.cache import profile_cache_spec
    from kernel_utils.stages import stage
    from kernel_utils.stages.fracture_settings import VertebraSettings

    settings = VertebraSettings.for_profile("full", model="mobilenetv3_small_050", epochs=1,
                                                max_steps_per_epoch=2, n_folds=2)
    spec = profile_cache_spec("bench")
    labels = pd.read_csv(Path(data_dir) / "train.csv")
    if eager:  # the inputs held in memory, one array per study, as build_inputs returned them before
        original = stage.cross_validate_fracture

        def in_memory(uids, inputs, *args, **kwargs):
            return original(uids, [inputs[i] for i in range(len(inputs))], *args, **kwargs)

        stage.cross_validate_fracture = in_memory
    start = time.perf_counter()
    run = stage.train_and_predict(settings, data_dir, work_dir, spec, labels,
                                  pd.read_csv(Path(data_dir) / "train_bounding_boxes.csv"), progress=False)
    return {"studies": len(run.train), "eager": eager, "seconds": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "input_mb_per_study": run.train[0].nbytes / 2**20}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="30,120")
    ap.add_argument("--child", nargs=3, metavar=("DATA", "WORK", "EAGER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.child[2] == "1")))
        return {}
    data_dir, bench_work = prepared_data("bench")
    runs = []
    for allocator, threshold in ALLOCATORS.items():
        for n in (int(v) for v in args.sizes.split(",")):
            data, work = subset(data_dir, bench_work, n)
            for eager in (False, True):
                shutil.rmtree(work / "models", ignore_errors=True)  # each run trains from scratch
                env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": threshold}
                out = subprocess.run([sys.executable, "-m", "benchmarks.training_memory", "--child", str(data),
                                      str(work), "1" if eager else "0"], check=True, capture_output=True, text=True,
                                     env=env)
                runs.append({"allocator": allocator, **json.loads(out.stdout.strip().splitlines()[-1])})
                print(runs[-1], flush=True)
    table = pd.DataFrame(runs).assign(inputs=lambda d: d.eager.map({False: "store", True: "eager_list"}))
    growth = {f"{a}/{i}": float(part.peak_rss_mb.iloc[-1] - part.peak_rss_mb.iloc[0])
              for (a, i), part in table.groupby(["allocator", "inputs"])}
    return write_result("training_memory", {
        "what": "peak RSS of notebook 03's per-vertebra training (train_and_predict) at two dataset sizes",
        "settings": "full profile input (15 slices x 4 ch x 128^2 per vertebra), mobilenetv3_small_050, 2 folds, "
                    "2 steps a fold",
        "allocators": {k: f"MALLOC_MMAP_THRESHOLD_={v}" for k, v in ALLOCATORS.items()},
        "runs": runs, "peak_rss_growth_mb": growth,
        "target": "the store's peak does not grow with the study count"})


if __name__ == "__main__":
    main()
