"""`make kaggle-check`: the Kaggle bundle installed and run in twins of the Kaggle image, one a Python version.

    python -m benchmarks.kaggle_check [--work-dir WORK] [--pythons 3.11 3.12]

A twin is a clean virtual environment with the image's versions of every package the kernel imports
(`kaggle_image.IMAGE`; torch as `TWIN_OVERRIDES` says), kept in `$KAGGLE_TWINS_DIR` (default
~/.cache/rsna-kit/kaggle-twins). For each twin: the bundle's own wheels are removed, then
the submission kernel runs from the bundle alone with the network cut (`unshare -n`, pip's configuration off): it
installs the wheels with `--no-index` as on Kaggle and writes `submission.csv` for the synthetic test studies. Then,
in the same twin and offline, every shipped JPEG Lossless decoder reads the real slices of `../shared/reference/dicom`,
and pretrained weights load from a `.safetensors` file and a Hugging Face cache folder. The record, with the versions
used, goes to `benchmarks/results/kaggle_check.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import ROOT, write_result
from benchmarks.demo_run import profile_settings
from kernel_utils.dev.bundle import make_bundle
from kernel_utils.dev.kaggle_image import BUNDLE, IMAGE, PYTHONS, TWIN_OVERRIDES, VERIFIED_WHEELS, wheel_tag
from kernel_utils.dev.pipeline import run
from kernel_utils.io.dicom_io import load_study
from kernel_utils.layout import WorkLayout
from kernel_utils.submit.writer import validate_submission

DATA = ROOT / ".data" / "kaggle_check"
# The twins are whole environments (about 6 GB each): outside the repository, so its tree holds only the kit's code.
TWINS = Path(os.environ.get("KAGGLE_TWINS_DIR", Path.home() / ".cache" / "rsna-kit" / "kaggle-twins"))
REFERENCE = ROOT.parents[1] / "shared" / "reference" / "dicom"
JPEG_LOSSLESS_STUDY = "1.2.826.0.1.3680043.14267"
TWIN_EXTRA = ["ipykernel"]  # papermill's kernel, as the image has it

PROBE = r'''
import hashlib, json, sys, tempfile
from pathlib import Path
bundle, reference = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(bundle))
import numpy as np, pydicom, torch
from pydicom.pixels import apply_rescale
from kernel_utils.io.dicom_io import load_study
out = {"decoders": {}, "pretrained": {}}
if reference.is_dir():
    for decoder in ("auto", "dicomsdl", "imagecodecs", "pydicom"):
        study = load_study(reference, decoder=decoder)
        out["decoders"][decoder] = {"used": study.decoder, "sha1": hashlib.sha1(study.hu.tobytes()).hexdigest()}
    for plugin in ("gdcm", "pylibjpeg"):  # pydicom's own plugins, each alone
        frames = []
        for f in sorted(reference.glob("*.dcm"), key=lambda p: int(p.stem)):
            ds = pydicom.dcmread(f)
            ds.pixel_array_options(decoding_plugin=plugin)
            frames.append(apply_rescale(ds.pixel_array, ds).astype(np.int16))
        out["decoders"]["pydicom:" + plugin] = {"used": plugin,
                                                "sha1": hashlib.sha1(np.stack(frames).tobytes()).hexdigest()}
import timm
from safetensors.torch import save_file
from kernel_utils.nets.backbones import load_pretrained, timm_backbone
source = timm.create_model("resnet10t", pretrained=False, in_chans=3, num_classes=0)
with tempfile.TemporaryDirectory() as tmp:
    file = Path(tmp) / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    hub = Path(tmp) / "models--timm--resnet10t.c3_in1k" / "snapshots" / "0123abcd"
    hub.mkdir(parents=True)
    (hub / "model.safetensors").write_bytes(file.read_bytes())
    for name, path in (("safetensors_file", file), ("hub_cache_folder", hub.parents[1])):
        model = timm_backbone("resnet10t", 3)
        load_pretrained(model, path)
        own = model.state_dict()
        out["pretrained"][name] = all(torch.equal(own[k], v) for k, v in source.state_dict().items())
print("PROBE " + json.dumps(out))
'''


def interpreter(version: str) -> str:
    """An interpreter of CPython `version`: on PATH, else one pyenv installed (its shims run only the selected one)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in [shutil.which(f"python{version}"), *sorted(pyenv.glob(f"{version}.*/bin/python{version}"))]:
        if candidate and subprocess.run([str(candidate), "--version"], capture_output=True).returncode == 0:
            return str(candidate)
    raise FileNotFoundError(f"no python{version} found (PATH, {pyenv}): the {version} twin needs one")


def twin_pins() -> list[str]:
    return [f"{name}=={TWIN_OVERRIDES.get(name, v)}" for name, v in IMAGE.items()] + TWIN_EXTRA


def make_twin(version: str, root: Path) -> Path:
    """The twin venv of one Python version (made once, reused while its pins hold); returns its python."""
    venv = root / f"py{version.replace('.', '')}"
    python = venv / "bin" / "python"
    marker = venv / ".twin_pins.json"
    if marker.exists() and json.loads(marker.read_text()) == twin_pins():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([interpreter(version), "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *twin_pins()],
                   check=True)
    subprocess.run([str(python), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], check=True,
                   capture_output=True)
    marker.write_text(json.dumps(twin_pins()))
    return python


def versions(python: Path) -> dict[str, str]:
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                            check=True, capture_output=True, text=True).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(listed)}


def offline(cmd: list[str]) -> list[str]:
    """`cmd` in a new network namespace with only loopback up (the kernel talks to papermill over it)."""
    return ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {shlex.join(cmd)}"]


def offline_env(python: Path) -> dict[str, str]:
    """No pip configuration (this machine's finds wheels on its disk), no hub, only the twin's Jupyter kernels."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON", "JUPYTER"))}
    venv = python.parents[1]
    return {**env, "PIP_CONFIG_FILE": os.devnull, "HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "JUPYTER_PATH": str(venv / "share" / "jupyter"), "JUPYTER_DATA_DIR": str(venv / "jupyter_data")}


def smoke_run(work_dir: Path) -> tuple[Path, Path]:
    """(data_dir, work_dir) of a finished smoke run with the smoke profile's current settings: run again when a
    setting changed since the last one."""
    data_dir, made_with = work_dir / "synthetic_smoke", work_dir / "kaggle_check_settings.json"
    settings = json.loads(json.dumps(profile_settings("smoke"), default=str))
    if not (WorkLayout(work_dir).submission.exists() and made_with.exists()
            and json.loads(made_with.read_text()) == settings):
        shutil.rmtree(work_dir, ignore_errors=True)
        run(None, work_dir, "smoke")
        made_with.write_text(json.dumps(settings))
    return data_dir, work_dir


def check_twin(version: str, bundle: Path, data_dir: Path, reference_submission: pd.Series) -> dict:
    """One twin: a clean install of the bundle, the kernel offline, the decoders, the pretrained weights."""
    start = time.perf_counter()
    python = make_twin(version, TWINS)
    made = time.perf_counter() - start
    shipped = [r.split("==")[0] for r in BUNDLE]
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *shipped], check=True, capture_output=True)
    image_versions = versions(python)
    kernel_work = DATA / f"kernel_work_{wheel_tag(version)}"
    shutil.rmtree(kernel_work, ignore_errors=True)
    start = time.perf_counter()
    notebook = subprocess.run(offline([
        str(python), "-m", "papermill", str(bundle.parent / "kernel" / "submission.ipynb"),
        str(DATA / f"submission_{wheel_tag(version)}.ipynb"), "-k", "python3", "--no-progress-bar",
        "-p", "BUNDLE_DIR", str(bundle), "-p", "DATA_DIR", str(data_dir), "-p", "WORK_DIR", str(kernel_work),
        "-y", "{INSTALL_WHEELS: true, ALL_MODELS: true}"]), env=offline_env(python), capture_output=True, text=True)
    kernel_seconds = time.perf_counter() - start
    if notebook.returncode:
        raise RuntimeError(f"the kernel failed in the {version} twin:\n{notebook.stderr[-4000:]}")
    validate_submission(kernel_work / "submission.csv", data_dir / "test.csv")
    executed = json.loads((DATA / f"submission_{wheel_tag(version)}.ipynb").read_text())
    kernels = pd.read_csv(kernel_work / "submission.csv").set_index("row_id").fractured
    probe = subprocess.run(offline([str(python), "-c", PROBE, str(bundle), str(REFERENCE / JPEG_LOSSLESS_STUDY)]),
                           env=offline_env(python), capture_output=True, text=True)
    if probe.returncode:
        raise RuntimeError(f"the decoder and weights probe failed in the {version} twin:\n{probe.stderr[-4000:]}")
    found = json.loads(probe.stdout.split("PROBE ", 1)[1])
    installed = versions(python)
    return {
        "python": subprocess.run([str(python), "-c", "import sys; print(sys.version.split()[0])"], check=True,
                                 capture_output=True, text=True).stdout.strip(),
        "kernel_python": executed["metadata"]["language_info"]["version"],
        "image_versions": {k: image_versions.get(k) for k in [*IMAGE, *TWIN_EXTRA]},
        "installed_from_bundle": {k: installed.get(k) for k in shipped},
        "twin_seconds": made, "kernel_seconds": kernel_seconds,
        "submission_rows": len(kernels),
        "max_abs_diff_from_kit_venv": float((kernels.loc[reference_submission.index]
                                             - reference_submission).abs().max()),
        **found,
    }


def host_decode_sha1() -> str | None:
    """The kit venv's HU of the real JPEG Lossless study (pydicom), as a SHA-1; None without the reference data."""
    folder = REFERENCE / JPEG_LOSSLESS_STUDY
    return hashlib.sha1(load_study(folder, decoder="pydicom").hu.tobytes()).hexdigest() if folder.is_dir() else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default="", help="a finished run to bundle; default: a smoke run made here")
    ap.add_argument("--data-dir", default="", help="the test studies to predict, with --work-dir")
    ap.add_argument("--pythons", nargs="+", default=list(PYTHONS))
    args = ap.parse_args(argv)
    DATA.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.work_dir:
        work_dir, data_dir = Path(args.work_dir), Path(args.data_dir or Path(args.work_dir) / "synthetic_demo")
    else:
        data_dir, work_dir = smoke_run(DATA / "work")
    reference = pd.read_csv(WorkLayout(work_dir).submission).set_index("row_id").fractured
    bundle = make_bundle(work_dir, DATA / "bundle", wheels=True, wheel_cache=DATA / "wheels") / "dataset"
    bundled = time.perf_counter() - start
    expected = host_decode_sha1()
    twins = {}
    for version in args.pythons:
        twins[version] = check_twin(version, bundle, data_dir, reference)
        print(json.dumps(twins[version], indent=1), flush=True)
    failures = [f"{v}: {what}" for v, t in twins.items() for what, ok in [
        ("the kernel ran in another Python", t["kernel_python"] == t["python"]),
        ("submission differs from the kit's", t["max_abs_diff_from_kit_venv"] < 1e-4),
        ("a decoder reads other pixels", expected is None or all(d["sha1"] == expected
                                                                 for d in t["decoders"].values())),
        ("pretrained weights did not load", all(t["pretrained"].values()))] if not ok]
    write_result("kaggle_check", {
        "twins": twins, "bundle": {"requirements": list(BUNDLE), "wheels": json.loads(
            (bundle / "wheels" / "manifest.json").read_text())},
        "reference_jpeg_lossless_sha1": expected, "seconds_bundle": bundled,
        "seconds_total": time.perf_counter() - start, "failures": failures})
    if failures:
        sys.exit("kaggle-check failed: " + "; ".join(failures))
    shutil.copy(bundle / "wheels" / "manifest.json", VERIFIED_WHEELS)  # what tests/test_kaggle_image.py reads
    print(f"kaggle-check passed for Python {', '.join(args.pythons)} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
