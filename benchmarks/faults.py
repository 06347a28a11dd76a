"""Every fault at once: `make run PROFILE=smoke` on a synthetic dataset holding one of each dataset fault
(`kernel_utils.dev.fault_injection`), with corrupt checkpoints where an earlier run left its weights, then the
Kaggle kernel's inference chain on the faulted test studies, and a pretrained file that would run code.

Records faults injected, runs finished, studies kept, rows written and crashes (must be 0) in
`benchmarks/results/faults.json`.

    python -m benchmarks.faults [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.common import ROOT, write_result
from kernel_utils.dev.fault_injection import (
    code_running_weights,
    inject_checkpoint_faults,
    inject_data_faults,
)
from kernel_utils.dev.pipeline import ensure_synthetic
from kernel_utils.nets.backbones import load_pretrained
from kernel_utils.submit.writer import submission_problems

PROFILE = "smoke"


def _run(command: list[str], log: Path) -> dict:
    """Run a command with its output in `log`; its exit code, whether a signal ended it, and its seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    return {"exit_code": code, "crashed": code < 0 or code >= 128, "seconds": round(time.perf_counter() - start, 1)}


def faulted_dataset(work_dir: Path) -> tuple[Path, pd.DataFrame]:
    """A fresh copy of the profile's synthetic dataset with every dataset fault in it."""
    clean = ensure_synthetic(work_dir / "clean", PROFILE)
    data_dir = work_dir / "faulted_data"
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(clean, data_dir)
    return data_dir, inject_data_faults(data_dir)


def outcome_of(fault: pd.Series, summary: pd.DataFrame) -> str:
    """What notebook 01 made of the study a fault was put in."""
    row = summary.loc[fault.uid]
    if row.status == "failed":
        return f"study failed: {row.error}"
    named = Path(fault.file).name in str(row.warnings)
    mask = "with mask" if bool(row.has_mask) else "without mask"
    return f"study {row.status}, {int(row.n_slices)} slices, {mask}, file {'named' if named else 'NOT named'}"


def pretrained_attack(folder: Path) -> dict:
    """A weights file whose unpickling would create a marker file: refused, and the marker never appears."""
    marker = folder / "code_ran"
    marker.unlink(missing_ok=True)
    weights = code_running_weights(folder / "evil_weights.pt", marker)
    try:
        load_pretrained(torch.nn.Linear(1, 1), weights)
        refused = ""
    except ValueError as e:
        refused = str(e).replace(str(folder), "WORK_DIR")[:200]
    return {"refused": bool(refused), "message": refused, "code_ran": marker.exists()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default=str(ROOT / ".data" / "faults"))
    args = ap.parse_args(argv)
    root = Path(args.work_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data_dir, faults = faulted_dataset(root)
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    checkpoints = inject_checkpoint_faults(work, PROFILE)
    pipeline = _run([sys.executable, "-m", "kernel_utils.dev.pipeline", "--data-dir", str(data_dir), "--work-dir",
                     str(work), "--profile", PROFILE], root / "pipeline.log")
    expected_rows = len(pd.read_csv(data_dir / "test.csv"))
    summary = pd.read_csv(work / "preprocess_summary.csv").set_index("StudyInstanceUID") \
        if (work / "preprocess_summary.csv").exists() else pd.DataFrame()
    submission = work / "submission.csv"
    rows = len(pd.read_csv(submission)) if submission.exists() else 0
    faults["outcome"] = [outcome_of(f, summary) if len(summary) else "no summary" for _, f in faults.iterrows()]
    checkpoints["outcome"] = ["set aside and retrained" if Path(f + ".corrupt").exists() and Path(f).exists()
                              else "NOT handled" for f in checkpoints.file]
    kernel = _run([sys.executable, "-c", "import sys; from kernel_utils.submit.predict import predict_test; "
                   "predict_test(sys.argv[1], sys.argv[2], sys.argv[3], all_models=True)",
                   str(data_dir), str(work), str(root / "kernel_submission.csv")], root / "kernel.log")
    kernel_rows = len(pd.read_csv(root / "kernel_submission.csv")) if (root / "kernel_submission.csv").exists() else 0
    attack = pretrained_attack(root)
    crashes = int(pipeline["crashed"]) + int(kernel["crashed"])
    result = {
        "profile": PROFILE, "faults_injected": len(faults) + len(checkpoints) + 1,
        "dataset_faults": faults.drop(columns=["file"]).to_dict(orient="records"),
        "checkpoint_faults": checkpoints.drop(columns=["file"]).to_dict(orient="records"),
        "pretrained_code_file": attack,
        "runs_finished": int(pipeline["exit_code"] == 0) + int(kernel["exit_code"] == 0), "runs": 2,
        "pipeline": pipeline, "kernel_inference": kernel, "crashes": crashes,
        "studies": int(len(summary)), "studies_kept": int((summary.status != "failed").sum()) if len(summary) else 0,
        "faulted_studies_kept": int(sum(not o.startswith("study failed") for o in faults.outcome)),
        "faulted_files_named": int(sum(o.endswith("file named") for o in faults.outcome)),
        "rows_expected": expected_rows, "rows_written": rows, "kernel_rows_written": kernel_rows,
        "submission_problems": submission_problems(submission, data_dir / "test.csv") if submission.exists()
        else ["no submission.csv"],
    }
    write_result("faults", result)
    return result


if __name__ == "__main__":
    main()
