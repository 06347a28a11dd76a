"""The Kaggle bundle against the Kaggle image: its wheels cover every import of the kernel for each Python version it
claims, and the kernel stops early on an image whose Python it carries no wheels for."""

from __future__ import annotations

import json

import pytest

from kernel_utils.dev.bundle import INSTALL_CELL
from kernel_utils.dev.kaggle_image import (
    BUNDLE,
    PYTHONS,
    VERIFIED_WHEELS,
    kernel_imports,
    uncovered_imports,
    wheel_fits,
)

JPEG_LOSSLESS_DECODERS = {"python-gdcm", "pylibjpeg-libjpeg", "imagecodecs"}


def shipped(wheels: list[str]) -> dict[str, str]:
    """wheel file names -> {distribution: version}"""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    return {canonicalize_name(name): str(version) for name, version, _, _ in map(parse_wheel_filename, wheels)}


def test_the_import_scan_reads_the_shipped_package_and_not_dev():
    found = kernel_imports()
    assert {"torch", "monai", "pydicom", "cv2", "timm", "nibabel", "safetensors"} <= found
    assert "kernel_utils" not in found and "os" not in found
    assert "papermill" not in found  # dev/pipeline imports it; dev/ is not shipped


def test_imports_the_image_lacks_are_named():
    assert uncovered_imports({"numpy", "cv2", "sklearn"}, set()) == set()
    assert uncovered_imports({"monai", "dicomsdl"}, set()) == {"monai", "dicomsdl"}
    assert uncovered_imports({"monai", "dicomsdl"}, {"monai", "dicomsdl"}) == set()


@pytest.mark.parametrize("name, python, fits", [
    ("pandas-2.3.3-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl", "3.11", True),
    ("pandas-2.3.3-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl", "3.12", False),
    ("imagecodecs-2026.3.6-cp311-abi3-manylinux_2_28_x86_64.whl", "3.12", True),
    ("imagecodecs-2026.3.6-cp311-abi3-manylinux_2_28_x86_64.whl", "3.10", False),
    ("monai-1.6.1-py3-none-any.whl", "3.12", True),
    ("dicomsdl-0.109.4-cp312-cp312-macosx_11_0_arm64.whl", "3.12", False),
])
def test_wheel_tags_are_read_for_the_python_and_platform(name, python, fits):
    assert wheel_fits(name, python) is fits


@pytest.mark.parametrize("python", PYTHONS)
def test_the_bundle_wheels_cover_every_import_of_the_kernel(python):
    manifest = json.loads(VERIFIED_WHEELS.read_text())  # written by a passing `make kaggle-check`
    assert python in manifest, f"{VERIFIED_WHEELS} has no wheels for Python {python}: run make kaggle-check"
    wheels = manifest[python]
    assert all(wheel_fits(w, python) for w in wheels), [w for w in wheels if not wheel_fits(w, python)]
    dists = shipped(wheels)
    for requirement in BUNDLE:
        name, version = requirement.split("==")
        assert dists.get(name) == version, (python, requirement, dists)
    assert uncovered_imports(kernel_imports(), set(dists)) == set()
    assert JPEG_LOSSLESS_DECODERS & set(dists), "the image has no JPEG Lossless decoder; the bundle must ship one"


def test_the_kernel_stops_at_once_on_a_python_the_bundle_has_no_wheels_for(tmp_path):
    (tmp_path / "wheels" / "cp39").mkdir(parents=True)
    scope = {"BUNDLE_DIR": str(tmp_path), "INSTALL_WHEELS": True, "DATA_DIR": "", "WORK_DIR": ""}
    with pytest.raises(RuntimeError, match=r"runs Python 3\.\d+\.\d+ and the bundle .* carries wheels for cp39: "):
        exec(INSTALL_CELL.format(slug="kit"), scope)
