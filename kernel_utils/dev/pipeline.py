"""`make run`: synthetic data when no data folder is given, every notebook in order through papermill,
then submission.csv checked against test.csv.

    python -m kernel_utils.dev.pipeline --work-dir work --profile demo [--data-dir DIR] [--only 01,05]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from kernel_utils.config import get_profile, resolve_work_dir
from kernel_utils.dev.run_summary import format_summary, run_summary
from kernel_utils.dev.synthetic import make_dataset
from kernel_utils.layout import WorkLayout
from kernel_utils.submit.writer import validate_submission

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order, optionally only those whose number is in `only`."""
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    return [p for p in found if not only or p.name[:2] in only]


def ensure_synthetic(work_dir: Path, profile_name: str, seed: int = 0) -> Path:
    """The profile's synthetic dataset under work_dir, made once (made in a temp folder, then renamed). Remade
    when the profile asks for another one, and then everything made from the old one goes too: its studies have
    the same uids, so its cache entries would otherwise be read as the new ones."""
    profile = get_profile(profile_name)
    out = work_dir / f"synthetic_{profile.name}"
    wanted = {"n_train": profile.synthetic_train, "n_test": profile.synthetic_test,
              "size": profile.synthetic_size, "seed": seed, "difficulty": profile.synthetic_difficulty}
    marker = out / "_truth" / "dataset.json"
    if marker.exists() and all(json.loads(marker.read_text()).get(k) == v for k, v in wanted.items()):
        return out
    tmp = work_dir / f".synthetic_{profile.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if out.exists():
        stale = [p for p in WorkLayout(work_dir).derived if p.exists()]
        print(f"{out} holds another dataset: removing it and what was made from it "
              f"({', '.join(p.name for p in stale) or 'nothing'})", flush=True)
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(out, ignore_errors=True)
    print(f"making the {profile.name} synthetic dataset: {wanted}", flush=True)
    make_dataset(str(tmp), profile.synthetic_train, profile.synthetic_test, profile.synthetic_size, seed,
                 profile.synthetic_difficulty)
    tmp.rename(out)
    return out


def kernel_options() -> dict:
    """papermill's kernel manager options: on Linux the kernel talks over socket files in Jupyter's runtime folder,
    not TCP on localhost (ipykernel warns of unencrypted TCP at every start); elsewhere papermill's defaults."""
    if not sys.platform.startswith("linux"):
        return {}
    from jupyter_client import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class LocalSocketKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    return {"kernel_manager_class": LocalSocketKernelManager}


def set_aside_previous_submission(work_dir: Path) -> Path | None:
    """Rename a previous run's submission.csv to previous_submission.csv, so a run that fails leaves no
    submission.csv behind that could be taken for its own."""
    old, kept = WorkLayout(work_dir).submission, WorkLayout(work_dir).previous_submission
    if not old.exists():
        return None
    old.replace(kept)
    print(f"the previous run's submission is now {kept}", flush=True)
    return kept


def run(data_dir: Path | None, work_dir: Path, profile: str, only: list[str] | None = None) -> Path:
    """Execute the notebooks into work_dir/executed/ and return the validated submission path."""
    import papermill as pm  # only here: the benchmarks use ensure_synthetic without Jupyter

    get_profile(profile)
    data_dir = data_dir or ensure_synthetic(work_dir, profile)
    executed = work_dir / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    planned = notebooks(only)
    if planned and planned[-1] == notebooks()[-1]:  # the submission notebook runs: it writes a new one
        set_aside_previous_submission(work_dir)
    seconds = {}
    for nb in planned:
        start = time.perf_counter()
        print(f"== {nb.name} ({profile}) ==", flush=True)
        pm.execute_notebook(str(nb), str(executed / nb.name), cwd=str(nb.parent), kernel_name="python3",
                            parameters={"DATA_DIR": str(data_dir), "WORK_DIR": str(work_dir), "PROFILE": profile},
                            **kernel_options())
        seconds[nb.stem] = time.perf_counter() - start
        print(f"   {nb.name}: {seconds[nb.stem]:.0f} s", flush=True)
    layout = WorkLayout(work_dir)
    submission = layout.submission
    validate_submission(submission, data_dir / "test.csv")
    if layout.ensemble_table.exists():
        print(f"== run summary ({profile}), also in {layout.run_summary} ==")
        print(format_summary(run_summary(data_dir, work_dir, seconds)), flush=True)
    return submission


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run every notebook in order and write submission.csv.")
    ap.add_argument("--data-dir", default=None, help="competition folder; default: a synthetic dataset")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 01,05")
    args = ap.parse_args(argv)
    work_dir = resolve_work_dir(args.work_dir).resolve()
    data_dir = Path(args.data_dir).resolve() if args.data_dir else None
    start = time.perf_counter()
    submission = run(data_dir, work_dir, args.profile, [s for s in args.only.split(",") if s])
    print(f"valid submission: {submission} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    sys.exit(main())
