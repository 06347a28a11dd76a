"""Reading studies: real bytes of every transfer syntax, every synthetic quirk, errors that name the file."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from conftest import SMOKE_ARGS, dicom_files
from pydicom.pixels import apply_rescale

from kernel_utils import DicomReadError, load_study
from kernel_utils.dev.dicom_writer import SeriesGeometry, hu_to_stored, write_ct_slice
from kernel_utils.dev.synthetic import StudySpec, plan_dataset, render_study

REAL = {"1.2.826.0.1.3680043.1476": "1.2.840.10008.1.2.1", "1.2.826.0.1.3680043.13203": "1.2.840.10008.1.2",
        "1.2.826.0.1.3680043.14267": "1.2.840.10008.1.2.4.70"}


@pytest.mark.parametrize("decoder", ["auto", "dicomsdl", "imagecodecs", "pydicom"])
@pytest.mark.parametrize("uid", sorted(REAL))
def test_real_slices_equal_pydicom_rescaled_pixels(reference, uid, decoder):
    folder = reference / "dicom" / uid
    study = load_study(folder, decoder=decoder)
    assert study.uid == uid and study.transfer_syntax == REAL[uid]
    expected = []
    for n in study.slice_numbers:
        ds = pydicom.dcmread(folder / f"{n}.dcm")
        expected.append(apply_rescale(ds.pixel_array, ds))
    assert study.hu.dtype == np.int16
    assert np.array_equal(study.hu, np.stack(expected))
    assert np.all(np.diff(study.z) < 0)  # head first
    assert study.hu.shape[1:] == (512, 512)


def test_jpeg_lossless_decoders_agree(reference):
    folder = reference / "dicom" / "1.2.826.0.1.3680043.14267"
    studies = {d: load_study(folder, decoder=d) for d in ("auto", "dicomsdl", "imagecodecs", "pydicom")}
    assert {d: s.decoder for d, s in studies.items()} == {
        "auto": "dicomsdl+imagecodecs", "dicomsdl": "dicomsdl", "imagecodecs": "imagecodecs", "pydicom": "pydicom"}
    for s in studies.values():
        assert np.array_equal(s.hu, studies["pydicom"].hu)


def test_a_frame_imagecodecs_refuses_falls_back_to_dicomsdl(reference, monkeypatch):
    import kernel_utils.io.dicom_io as dicom_io

    class Refusing:
        @staticmethod
        def jpeg8_decode(frame, out=None):
            raise RuntimeError("not this one")

    folder = reference / "dicom" / "1.2.826.0.1.3680043.14267"
    expected = load_study(folder, decoder="pydicom").hu
    monkeypatch.setattr(dicom_io, "_imagecodecs", lambda: Refusing)
    study = load_study(folder)
    assert study.decoder == "dicomsdl" and np.array_equal(study.hu, expected)


def test_every_decoder_reads_every_synthetic_encoding(smoke_dir):
    for spec in plan_dataset(**SMOKE_ARGS)[:8]:
        truth = render_study(spec)
        for decoder in ("auto", "dicomsdl", "imagecodecs", "pydicom"):
            study = load_study(smoke_dir / f"{spec.split}_images" / spec.uid, decoder=decoder)
            assert np.array_equal(study.hu, truth.hu), (spec.encoding, decoder)


def test_every_synthetic_quirk_reads_as_the_truth_head_first(smoke_dir):
    for spec in plan_dataset(**SMOKE_ARGS):
        truth = render_study(spec)
        study = load_study(smoke_dir / f"{spec.split}_images" / spec.uid)
        assert np.array_equal(study.hu, truth.hu), spec
        assert np.array_equal(study.slice_numbers, truth.slice_numbers), spec
        assert np.allclose(study.z, truth.z) and np.all(np.diff(study.z) < 0)
        assert study.reversed == spec.reversed
        assert study.duplicates_dropped == (len(truth.z) if spec.duplicated else 0)
        assert study.spacing == pytest.approx((spec.spacing, spec.pixel_spacing, spec.pixel_spacing), rel=1e-4)


@pytest.mark.parametrize("encoding", ["explicit_int16", "jpeg_lossless_uint12"])
def test_non_square_series_in_shuffled_order(tmp_path, encoding):
    uid = "1.2.826.0.1.3680043.99"
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, size=(5, 48, 80)).astype(np.int16)
    z = np.array([10.0, 8.5, 7.0, 5.5, 4.0])
    numbers = [3, 1, 5, 2, 4]  # file names unrelated to position
    for k, n in enumerate(numbers):
        write_ct_slice(str(tmp_path / f"{n}.dcm"), uid, n, z[k], SeriesGeometry(0, 0, 0.7, 0.5, 1.0),
                       hu_to_stored(hu[k], encoding), encoding)
    study = load_study(tmp_path)
    assert np.array_equal(study.hu, hu) and list(study.slice_numbers) == numbers
    assert study.spacing == pytest.approx((1.5, 0.7, 0.5))
    assert any("folder name differs" in w for w in study.warnings)


def test_a_truncated_file_is_dropped_and_named_and_too_many_fail_the_study(tmp_path, smoke_dir, caplog):
    spec = next(s for s in plan_dataset(**SMOKE_ARGS) if not s.duplicated)
    shutil.copytree(smoke_dir / f"{spec.split}_images" / spec.uid, tmp_path / spec.uid)
    files = dicom_files(tmp_path / spec.uid)
    whole = load_study(tmp_path / spec.uid)
    files[3].write_bytes(files[3].read_bytes()[:-200])
    study = load_study(tmp_path / spec.uid)
    assert study.unreadable == 1 and len(study.z) == len(whole.z) - 1
    assert files[3].name in study.warnings[0] and files[3].name in caplog.text
    for f in files[: len(files) // 2 + 1]:
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DicomReadError, match=f"of {len(files)} files readable"):
        load_study(tmp_path / spec.uid)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DicomReadError, match="not found"):
        load_study(tmp_path / "nope")
    with pytest.raises(DicomReadError, match="no <slice number>.dcm files"):
        load_study(tmp_path)


def test_study_larger_than_the_dataset_size(tmp_path):
    spec = StudySpec(uid="1.2.826.0.1.3680043.768", split="train", seed=(0, 0), rows=96, cols=96,
                     pixel_spacing=2.0, thickness=8.0, spacing=8.0, encoding="implicit_int16")
    from kernel_utils.dev.synthetic import write_study

    write_study(spec, str(tmp_path))
    study = load_study(tmp_path / "train_images" / spec.uid)
    assert study.hu.shape[1:] == (96, 96)
    assert np.array_equal(study.hu, render_study(spec).hu)
