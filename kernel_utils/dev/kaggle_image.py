"""What the Kaggle image holds, what the submission kernel imports, and the wheels the bundle adds.

The image's versions are those of Kaggle/docker-python's `installed_cpu_packages.txt` (main branch) for the packages
the kernel imports. `kernel_imports()` reads the shipped package's imports; `BUNDLE` (requirements-kaggle.txt) is
what the bundle installs on top of the image; `download_closure()` fetches their wheels and the dependencies the
image lacks, for one Python version, without installing anything.
"""

from __future__ import annotations

import ast
import email.parser
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

PACKAGE = Path(__file__).resolve().parents[1]
PYTHONS = ("3.11", "3.12")  # the bundle carries wheels for each
# The image's versions of what the kernel imports or runs with.
IMAGE = {"numpy": "2.4.6", "pandas": "2.3.3", "scikit-learn": "1.6.1", "matplotlib": "3.10.0", "scipy": "1.16.3",
         "timm": "1.0.26", "accelerate": "1.13.0", "torch": "2.10.0", "torchvision": "0.25.0",
         "opencv-python": "4.13.0.92", "pydicom": "3.0.2", "nibabel": "5.4.2", "einops": "0.8.2",
         "papermill": "2.7.0", "psutil": "5.9.5"}
# Also in the image, with versions the issue that set IMAGE did not give (timm's and papermill's dependencies):
# the twin lets pip pick them, and the bundle never ships them.
IMAGE_ALSO = ("tqdm", "safetensors", "huggingface-hub", "pyyaml", "packaging", "pillow", "ipykernel", "nbformat",
              "requests", "filelock", "typing-extensions", "jinja2", "sympy", "networkx", "fsspec",
              "importlib-resources")
# What this machine can install instead, and why it differs from IMAGE.
TWIN_OVERRIDES = {"torch": "2.14.1", "torchvision": "0.29.1"}  # the releases on this machine's disk (cap 2.14.1)
# The bundle's own: what the image lacks (MONAI, the DICOM decoders the kit prefers). JPEG Lossless needs one of
# python-gdcm, pylibjpeg + pylibjpeg-libjpeg, or imagecodecs: the image has none.
BUNDLE = ("monai==1.6.1", "python-gdcm==3.2.6", "pylibjpeg==2.1.0", "pylibjpeg-libjpeg==2.5.0", "dicomsdl==0.109.4",
          "imagecodecs==2026.3.6")
VERIFIED_WHEELS = Path(__file__).with_name("kaggle_wheels.json")  # the wheel set of the last passing kaggle-check
# import name -> distribution, where they differ
MODULE_DIST = {"cv2": "opencv-python", "sklearn": "scikit-learn", "gdcm": "python-gdcm", "yaml": "pyyaml",
               "PIL": "pillow"}
OPENCV = {"opencv-python", "opencv-python-headless"}  # one import, either wheel
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]  # glibc 2.35


def wheel_tag(python_version: str) -> str:
    """'3.12' -> 'cp312', the bundle's wheel folder name."""
    return "cp" + python_version.replace(".", "")


def kernel_imports(package: Path = PACKAGE) -> set[str]:
    """Top-level third-party modules the shipped package imports anywhere (lazy imports too); dev/ is not shipped."""
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for path in package.rglob("*.py"):
        if "dev" in path.relative_to(package).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[0] for n in names}
    return {m for m in found if m not in stdlib and m != package.name}


def dist_of(module: str) -> str:
    return canonicalize_name(MODULE_DIST.get(module, module))


def uncovered_imports(imports: set[str], shipped: set[str]) -> set[str]:
    """The kernel's imports that neither the image nor the shipped distributions provide."""
    have = {canonicalize_name(d) for d in [*IMAGE, *IMAGE_ALSO]} | {canonicalize_name(d) for d in shipped}
    if have & OPENCV:
        have |= OPENCV
    return {m for m in imports if dist_of(m) not in have}


def _cpython(tag: str) -> tuple[int, int] | None:
    """'cp312' -> (3, 12); None for another interpreter."""
    m = re.fullmatch(r"cp3(\d+)", tag)
    return (3, int(m.group(1))) if m else None


def wheel_fits(filename: str, python_version: str) -> bool:
    """Whether a wheel installs on CPython `python_version` on linux x86_64 (glibc 2.35)."""
    want = tuple(int(v) for v in python_version.split("."))[:2]
    for tag in parse_wheel_filename(filename)[3]:
        interpreter = _cpython(tag.interpreter)
        python_ok = (tag.interpreter in ("py3", f"py3{want[1]}") or interpreter == want
                     or (tag.abi == "abi3" and interpreter is not None and interpreter <= want))
        platform_ok = tag.platform in ("any", *PLATFORMS, "manylinux1_x86_64", "manylinux2010_x86_64")
        if python_ok and platform_ok:
            return True
    return False


def _requires(wheel: Path, python_version: str) -> list[Requirement]:
    """A wheel's unconditional dependencies (extras left out) on linux x86_64 CPython `python_version`."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        headers = email.parser.Parser().parsestr(z.read(meta).decode())
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    reqs = [Requirement(r) for r in headers.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def download_closure(requirements: list[str], dest: Path, python_version: str) -> list[Path]:
    """Wheels of `requirements` and of every dependency the image lacks, for CPython `python_version` on manylinux
    x86_64, into `dest`; returns them. Dependencies the image holds are not fetched (the kernel keeps the image's)."""
    dest.mkdir(parents=True, exist_ok=True)
    image = {canonicalize_name(d) for d in [*IMAGE, *IMAGE_ALSO]}
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    queue, seen = list(requirements), set()
    while queue:
        req = Requirement(queue.pop(0))
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        before = set(dest.glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                        "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(dest),
                        str(req)], check=True)
        new = list(set(dest.glob("*.whl")) - before) or [
            w for w in dest.glob("*.whl") if canonicalize_name(parse_wheel_filename(w.name)[0]) == name]
        for wheel in new:
            queue += [str(r) for r in _requires(wheel, python_version) if canonicalize_name(r.name) not in image]
    return sorted(dest.glob("*.whl"))
