"""`make kaggle-bundle`: a folder ready for `kaggle datasets create` and `kaggle kernels push`.

    python -m kernel_utils.dev.bundle --work-dir work --out dist/kaggle [--wheels] [--owner USER]

dist/kaggle/dataset/: kernel_utils, the trained weights and configs (`work/`), `requirements-kaggle.txt`, the wheels
for an offline install (with --wheels, downloaded now: `wheels/cp311/`, `wheels/cp312/`, one folder a Python version
of `kaggle_image.PYTHONS`, with the dependencies the image lacks), `dataset-metadata.json`.
dist/kaggle/kernel/: `submission.ipynb` (checks that the bundle has wheels for the image's Python, installs them
with `--no-index` when it finds /kaggle/input, then runs `kernel_utils.submit.predict.predict_test`) and
`kernel-metadata.json` (competition source, internet off, GPU on). The bundle's kernel_utils leaves out dev/ (the
synthetic data and the runners). `make kaggle-check` installs and runs it in twins of the image
(`benchmarks/kaggle_check.py`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import nbformat

from kernel_utils.dev.kaggle_image import BUNDLE, PYTHONS, download_closure, wheel_tag
from kernel_utils.layout import WorkLayout

PACKAGE = Path(__file__).resolve().parents[1]  # kernel_utils; its dev/ stays behind
COMPETITION = "rsna-2022-cervical-spine-fracture-detection"
WEIGHT_PATTERNS = ("models/**/*_best.pt", "models/**/*_config.json", "localisation/models/*_best.pt",
                   "localisation/models/*_config.json", "localisation/localisation.json", "predictions/*.json")


def _not_shipped(folder: str, names: list[str]) -> list[str]:
    """What the bundle leaves out of kernel_utils: byte code, and dev/ (synthetic data, runners) at its top."""
    top = Path(folder) == PACKAGE
    return [n for n in names if n == "__pycache__" or n.endswith(".pyc") or (top and n == "dev")]


def copy_weights(work_dir: Path, dest: Path) -> list[Path]:
    """The best checkpoints, configs and stage metadata of a run (not `_last.pt`, not the cache)."""
    copied = []
    for pattern in WEIGHT_PATTERNS:
        for src in work_dir.glob(pattern):
            target = dest / src.relative_to(work_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
            copied.append(target)
    if not WorkLayout(dest).ensemble_meta.exists():
        raise FileNotFoundError(f"{work_dir}/predictions/ensemble.json not found: run the notebooks (make run) first")
    return copied


def download_wheels(dest: Path, pythons: tuple[str, ...] = PYTHONS) -> dict[str, list[str]]:
    """Wheels of the bundle's requirements and the dependencies the image lacks, one folder a Python version
    (`dest/cp311`, ...); returns {python version: wheel file names}, also written to `dest/manifest.json`."""
    manifest = {v: [w.name for w in download_closure(list(BUNDLE), dest / wheel_tag(v), v)] for v in pythons}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


INSTALL_CELL = """import shutil, subprocess, sys
from pathlib import Path

bundle = Path(BUNDLE_DIR or "/kaggle/input/{slug}")
wheels = bundle / "wheels"
python = f"cp{{sys.version_info.major}}{{sys.version_info.minor}}"
if INSTALL_WHEELS is True or (INSTALL_WHEELS == "auto" and Path("/kaggle/input").is_dir()):
    carried = sorted(p.name for p in wheels.glob("cp*") if p.is_dir())
    if python not in carried:
        raise RuntimeError(f"This image runs Python {{sys.version.split()[0]}} and the bundle {{bundle}} carries "
                           f"wheels for {{', '.join(carried) or 'no Python'}}: rebuild it with `make kaggle-bundle` "
                           f"after adding {{sys.version_info.major}}.{{sys.version_info.minor}} to PYTHONS "
                           f"(kernel_utils/dev/kaggle_image.py)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
                    str(wheels / python), "-r", str(bundle / "requirements-kaggle.txt")], check=True)
sys.path.insert(0, str(bundle))
from kernel_utils.config import resolve_data_dir, resolve_work_dir
from kernel_utils.submit.predict import predict_test
from kernel_utils.submit.writer import validate_submission

data_dir, work_dir = resolve_data_dir(DATA_DIR), resolve_work_dir(WORK_DIR)
shutil.copytree(bundle / "work", work_dir, dirs_exist_ok=True)"""


def submission_notebook(slug: str) -> nbformat.NotebookNode:
    """The kernel: parameters, offline install, inference, validation."""
    cells = [
        nbformat.v4.new_code_cell(
            f'BUNDLE_DIR = ""  # the attached dataset; empty: /kaggle/input/{slug}\n'
            'DATA_DIR = ""    # empty: the competition folder on Kaggle\n'
            'WORK_DIR = ""    # empty: /kaggle/working\n'
            'PROFILE = "full"  # the profile the weights were trained with (informational)\n'
            "ALL_MODELS = False  # True: run every model, also those the blend gives no weight (timing, checks)\n"
            'INSTALL_WHEELS = "auto"  # "auto": install the bundle\'s wheels on Kaggle; True: always; False: never',
            metadata={"tags": ["parameters"]}),
        nbformat.v4.new_markdown_cell("# RSNA 2022 submission from the kit's bundle (offline)"),
        nbformat.v4.new_code_cell(INSTALL_CELL.format(slug=slug)),
        nbformat.v4.new_code_cell(
            "submission = predict_test(data_dir, work_dir, all_models=ALL_MODELS)\n"
            'validate_submission(work_dir / "submission.csv", data_dir / "test.csv")\n'
            "submission.head(8)"),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def make_bundle(work_dir: str | Path, out: str | Path, owner: str = "your-kaggle-username",
                slug: str = "rsna-2022-kit", wheels: bool = False, wheel_cache: Path | None = None) -> Path:
    """Write dataset/ and kernel/ under `out`; returns `out`. With `wheels`, the wheels are downloaded into
    `wheel_cache` (reused by the next bundle; default: the bundle's own folder) and copied in."""
    work_dir, out = Path(work_dir), Path(out)
    dataset, kernel = out / "dataset", out / "kernel"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(PACKAGE, dataset / "kernel_utils", ignore=_not_shipped)
    copy_weights(work_dir, dataset / "work")
    (dataset / "requirements-kaggle.txt").write_text("\n".join(BUNDLE) + "\n")
    if wheels:
        download_wheels(wheel_cache or dataset / "wheels")
        if wheel_cache:
            shutil.copytree(wheel_cache, dataset / "wheels")
    (dataset / "dataset-metadata.json").write_text(json.dumps(
        {"title": "RSNA 2022 kit bundle", "id": f"{owner}/{slug}", "licenses": [{"name": "CC0-1.0"}]}, indent=1))
    kernel.mkdir(parents=True)
    nbformat.write(submission_notebook(slug), kernel / "submission.ipynb")
    (kernel / "kernel-metadata.json").write_text(json.dumps({
        "id": f"{owner}/{slug}-submission", "title": "RSNA 2022 kit submission", "code_file": "submission.ipynb",
        "language": "python", "kernel_type": "notebook", "is_private": True, "enable_gpu": True,
        "enable_internet": False, "dataset_sources": [f"{owner}/{slug}"], "competition_sources": [COMPETITION],
        "kernel_sources": []}, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="work")
    ap.add_argument("--out", default="dist/kaggle")
    ap.add_argument("--owner", default="your-kaggle-username")
    ap.add_argument("--wheels", action="store_true", help="download the offline wheels now (needs PyPI)")
    args = ap.parse_args(argv)
    out = make_bundle(args.work_dir, args.out, args.owner, wheels=args.wheels)
    print(f"bundle: {out}/dataset (kaggle datasets create -p {out}/dataset), "
          f"{out}/kernel (kaggle kernels push -p {out}/kernel)")


if __name__ == "__main__":
    main()
