"""`make kaggle-bundle`: a folder ready for `kaggle datasets create` and `kaggle kernels push`.

    python -m kernel_utils.dev.bundle --work-dir work --out dist/kaggle [--wheels] [--owner USER]

dist/kaggle/dataset/: kernel_utils, the trained weights and configs (`work/`), `requirements-kaggle.txt`, the wheels
for an offline install (with --wheels, downloaded now for the Kaggle image's Python), `dataset-metadata.json`.
dist/kaggle/kernel/: `submission.ipynb` (installs from the attached wheels when it finds /kaggle/input, then runs
`kernel_utils.submit.predict.predict_test`) and `kernel-metadata.json` (competition source, internet off, GPU
on). The bundle's kernel_utils leaves out dev/ (the synthetic data and the runners).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from kernel_utils.layout import WorkLayout

PACKAGE = Path(__file__).resolve().parents[1]  # kernel_utils; its dev/ stays behind
COMPETITION = "rsna-2022-cervical-spine-fracture-detection"
# What the Kaggle image lacks (it has torch, torchvision, numpy, pandas, scikit-learn, opencv, matplotlib, tqdm).
KAGGLE_REQUIREMENTS = ["pydicom==3.0.2", "python-gdcm==3.2.6", "dicomsdl==0.109.4", "pylibjpeg==2.1.0",
                       "pylibjpeg-libjpeg==2.5.0", "nibabel==5.4.2", "timm==1.0.31", "monai==1.6.1", "einops==0.8.2",
                       "accelerate==1.15.0"]
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


def download_wheels(dest: Path, python_version: str = "3.11") -> None:
    """Wheels of KAGGLE_REQUIREMENTS and their dependencies for the Kaggle image (manylinux x86_64)."""
    dest.mkdir(parents=True, exist_ok=True)
    tags = ["manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]  # glibc 2.35
    platforms = [arg for tag in tags for arg in ("--platform", tag)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python_version,
                    *platforms, "--implementation", "cp", "-d", str(dest), *KAGGLE_REQUIREMENTS, "--no-deps"],
                   check=True)


def submission_notebook(slug: str) -> nbformat.NotebookNode:
    """The kernel: parameters, offline install, inference, validation."""
    cells = [
        nbformat.v4.new_code_cell(
            f'BUNDLE_DIR = ""  # the attached dataset; empty: /kaggle/input/{slug}\n'
            'DATA_DIR = ""    # empty: the competition folder on Kaggle\n'
            'WORK_DIR = ""    # empty: /kaggle/working\n'
            'PROFILE = "full"  # the profile the weights were trained with (informational)\n'
            "ALL_MODELS = False  # True: run every model, also those the blend gives no weight (timing, checks)",
            metadata={"tags": ["parameters"]}),
        nbformat.v4.new_markdown_cell("# RSNA 2022 submission from the kit's bundle (offline)"),
        nbformat.v4.new_code_cell(
            "import shutil, subprocess, sys\nfrom pathlib import Path\n\n"
            f'bundle = Path(BUNDLE_DIR or "/kaggle/input/{slug}")\n'
            'wheels = bundle / "wheels"\n'
            'if Path("/kaggle/input").is_dir() and wheels.is_dir():\n'
            '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",\n'
            '                    "--find-links", str(wheels), "-r", str(bundle / "requirements-kaggle.txt")],\n'
            '                   check=True)\n'
            "sys.path.insert(0, str(bundle))\n"
            "from kernel_utils.config import resolve_data_dir, resolve_work_dir\n"
            "from kernel_utils.submit.predict import predict_test\n"
            "from kernel_utils.submit.writer import validate_submission\n\n"
            "data_dir, work_dir = resolve_data_dir(DATA_DIR), resolve_work_dir(WORK_DIR)\n"
            'shutil.copytree(bundle / "work", work_dir, dirs_exist_ok=True)'),
        nbformat.v4.new_code_cell(
            "submission = predict_test(data_dir, work_dir, all_models=ALL_MODELS)\n"
            'validate_submission(work_dir / "submission.csv", data_dir / "test.csv")\n'
            "submission.head(8)"),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def make_bundle(work_dir: str | Path, out: str | Path, owner: str = "your-kaggle-username",
                slug: str = "rsna-2022-kit", wheels: bool = False) -> Path:
    """Write dataset/ and kernel/ under `out`; returns `out`."""
    work_dir, out = Path(work_dir), Path(out)
    dataset, kernel = out / "dataset", out / "kernel"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(PACKAGE, dataset / "kernel_utils", ignore=_not_shipped)
    copy_weights(work_dir, dataset / "work")
    (dataset / "requirements-kaggle.txt").write_text("\n".join(KAGGLE_REQUIREMENTS) + "\n")
    if wheels:
        download_wheels(dataset / "wheels")
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
