"""Faults of real data, one at a time: no single bad file ends a run, loses a study or runs code.

The notebooks' own test (test_notebooks.py) runs all five on the smoke data with every one of these faults at once.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import dicom_files
from test_training import Toy, mse

from kernel_utils import load_study
from kernel_utils.dev.fault_injection import (
    COMPRESSED,
    UNCOMPRESSED,
    add_stray_file,
    code_running_weights,
    cut_file,
    drop_position,
    garbage_file,
    half_file,
    resize_slice,
    slice_files,
)
from kernel_utils.dev.pipeline import set_aside_previous_submission
from kernel_utils.io import cache as cache_mod
from kernel_utils.io.cache import CacheSpec, cache_dir, read_entry
from kernel_utils.io.cache_build import build_cache
from kernel_utils.io.dicom_guard import checked_pixel_length
from kernel_utils.io.dicom_series import DicomReadError
from kernel_utils.io.npz_store import remove_orphan_temps
from kernel_utils.nets.backbones import load_pretrained, read_weights
from kernel_utils.training import CheckpointError, TrainConfig, checkpoint_paths, fit, load_best

NATIVE = CacheSpec(image_size=None)


def _copy_study(smoke_dir: Path, tmp_path: Path, encodings: tuple[str, ...]) -> tuple[Path, pd.Series]:
    truth = pd.read_csv(smoke_dir / "_truth" / "studies.csv")
    row = truth[truth.encoding.isin(encodings) & ~truth["duplicated"]].iloc[0]
    dest = tmp_path / row.split / row.uid
    shutil.copytree(smoke_dir / f"{row.split}_images" / row.uid, dest)
    return dest, row


@pytest.mark.parametrize("share", [0.1, 0.5, 0.999])
def test_a_cut_uncompressed_file_never_reaches_the_native_reader(smoke_dir, tmp_path, share):
    folder, _ = _copy_study(smoke_dir, tmp_path, UNCOMPRESSED)
    files = dicom_files(folder)
    whole = files[2].stat().st_size
    assert checked_pixel_length(files[2]) is not None and checked_pixel_length(files[2]) < whole
    cut_file(files[2], share)
    assert checked_pixel_length(files[2]) is None
    probe = ("import sys; from kernel_utils import load_study; s = load_study(sys.argv[1]); "
             "print(s.unreadable, len(s.z), s.decoder)")
    done = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # dicomsdl would have segfaulted (-11) on this file
    unreadable, n, decoder = done.stdout.split()
    assert (int(unreadable), int(n)) == (1, len(files) - 1) and "dicomsdl" in decoder
    assert files[2].name in done.stderr


def test_cut_real_slices_of_every_transfer_syntax_are_refused_before_the_native_reader(reference, tmp_path):
    for study in sorted((reference / "dicom").iterdir()):
        source = dicom_files(study)[0]
        assert checked_pixel_length(source) is not None, source
        for share in (0.002, 0.3, 0.9, 0.9999):
            cut = tmp_path / f"{study.name}_{share}.dcm"
            cut.write_bytes(source.read_bytes()[:int(source.stat().st_size * share)])
            assert checked_pixel_length(cut) is None, (source, share)


def test_a_cut_jpeg_lossless_file_is_dropped_and_named(smoke_dir, tmp_path):
    folder, _ = _copy_study(smoke_dir, tmp_path, COMPRESSED)
    files = dicom_files(folder)
    cut_file(files[1], 0.5)
    for decoder in ("auto", "pydicom"):
        study = load_study(folder, decoder=decoder)
        assert study.unreadable == 1 and len(study.z) == len(files) - 1
        assert files[1].name in study.warnings[0]


def test_stray_odd_sized_and_unplaced_slices_are_dropped_and_the_rest_kept(smoke_dir, tmp_path):
    folder, _ = _copy_study(smoke_dir, tmp_path, UNCOMPRESSED + COMPRESSED)
    files = dicom_files(folder)
    whole = load_study(folder)
    add_stray_file(folder)
    resize_slice(files[0], 40, 40)  # the first file read is the odd one: the study is read again at the others' size
    drop_position(files[5])
    study = load_study(folder)
    assert study.ignored == 1 and study.unreadable == 2 and study.shape[1:] == whole.shape[1:]
    kept = ~np.isin(whole.slice_numbers, [int(files[0].stem), int(files[5].stem)])
    assert np.array_equal(study.hu, whole.hu[kept]) and np.array_equal(study.z, whole.z[kept])
    text = " ".join(study.warnings)
    assert "._1.dcm" in text and files[0].name in text and files[5].name in text and "ImagePositionPatient" in text
    entry = cache_mod.window_study(folder, NATIVE)
    assert len(entry["images"]) == len(study.z) and "._1.dcm" in entry["meta"].item()


def test_a_single_slice_study_is_read_and_said(smoke_dir, tmp_path):
    folder, _ = _copy_study(smoke_dir, tmp_path, UNCOMPRESSED)
    for f in dicom_files(folder)[1:]:
        f.unlink()
    study = load_study(folder)
    assert study.shape[0] == 1 and any("single slice" in w for w in study.warnings)


def test_a_study_with_no_readable_file_fails_with_its_reason(smoke_dir, tmp_path):
    folder, _ = _copy_study(smoke_dir, tmp_path, UNCOMPRESSED)
    for f in dicom_files(folder):
        cut_file(f, 0.01)
    with pytest.raises(DicomReadError, match="0 of"):
        load_study(folder)


def test_segmentations_that_do_not_fit_keep_the_study_and_its_images(faulted_smoke, tmp_path):
    data_dir, faults = faulted_smoke
    for fault in ("NIfTI origin shifted 50 mm", "NIfTI one slice short", "cut JPEG Lossless slice"):
        row = faults[faults.fault == fault].iloc[0]
        if row.split != "train":
            continue
        seg = data_dir / "segmentations" / f"{row.uid}.nii"
        entry = read_entry(Path(cache_mod.build_entry(data_dir / "train_images" / row.uid, NATIVE,
                                                      cache_dir(tmp_path, NATIVE), seg)["path"]))
        truth = np.load(data_dir / "_truth" / f"{row.uid}.npz")
        assert len(entry["images"]) >= len(truth["z"]) - 1, fault  # the images are kept
        meta = entry["meta"].item()
        if fault == "NIfTI one slice short":
            assert "mask" not in entry and f"{row.uid}.nii" in meta
        elif seg.exists():  # aligned by the array axes, or matched by z around the dropped slice
            index = {n: k for k, n in enumerate(truth["slice_numbers"])}
            expected = truth["labels"][[index[n] for n in entry["slice_numbers"]]]
            assert np.array_equal(entry["mask"], expected), fault
            assert f"{row.uid}.nii" in meta, fault


def test_a_cut_segmentation_file_keeps_the_study_without_a_mask(smoke_dir, tmp_path):
    truth = pd.read_csv(smoke_dir / "_truth" / "studies.csv")
    uid = truth[truth.segmented].uid.iloc[0]
    nii = cut_file(shutil.copy(smoke_dir / "segmentations" / f"{uid}.nii", tmp_path / f"{uid}.nii"), 0.5)
    row = cache_mod.build_entry(smoke_dir / "train_images" / uid, NATIVE, cache_dir(tmp_path, NATIVE), nii)
    assert row["status"] == "built" and not row["has_mask"] and f"{uid}.nii" in row["warnings"]


def test_a_broken_worker_process_costs_no_study(smoke_dir, tmp_path, monkeypatch):
    victim = sorted(p.name for p in (smoke_dir / "train_images").iterdir())[1]
    real = cache_mod.window_study

    def crashing(study_dir, spec, segmentation_path=None, decoder="auto", reuse_buffer=False):
        if Path(study_dir).name == victim and decoder != "pydicom":
            faulthandler.disable()  # no traceback print from the dying worker
            os.kill(os.getpid(), signal.SIGSEGV)  # what dicomsdl did on a cut file
        return real(study_dir, spec, segmentation_path, decoder, reuse_buffer)

    monkeypatch.setattr(cache_mod, "window_study", crashing)
    summary = build_cache(smoke_dir, tmp_path, "train", CacheSpec(image_size=32), workers=2, progress=False)
    assert len(summary) == len(list((smoke_dir / "train_images").iterdir()))
    # a study the other worker finished writing as the pool broke is read back as cached: in the cache either way
    assert summary.status.isin(["built", "cached"]).all(), summary.status.value_counts().to_dict()
    assert "dicomsdl" not in summary.set_index("StudyInstanceUID").loc[victim, "decoder"]  # read by pydicom


def test_a_flipped_bit_is_not_reported_as_cached_and_orphan_temps_are_cleaned(smoke_dir, tmp_path):
    spec = CacheSpec(image_size=32)
    build_cache(smoke_dir, tmp_path, "test", spec, workers=1, progress=False)
    folder = cache_dir(tmp_path, spec)
    entry = sorted(folder.glob("*.npz"))[0]
    with zipfile.ZipFile(entry) as z:
        offset = z.getinfo("images.npy").header_offset + 200
    data = bytearray(entry.read_bytes())
    data[offset] ^= 0x01
    entry.write_bytes(bytes(data))
    dead = folder / f".{entry.name}.999999999.tmp"
    dead.write_bytes(b"half")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    fresh = folder / f".{entry.name}.999999998.tmp"  # just written, maybe by another machine sharing the folder
    fresh.write_bytes(b"half")
    again = build_cache(smoke_dir, tmp_path, "test", spec, workers=1, progress=False).set_index("StudyInstanceUID")
    assert again.loc[entry.stem, "status"] == "built" and (again.drop(entry.stem).status == "cached").all()
    assert not dead.exists() and fresh.exists()
    assert remove_orphan_temps(folder, age_s=0) == [fresh]
    read_entry(entry)


CFG = TrainConfig(stage="toy", model="linear", epochs=3, batch_size=16, lr=1e-2, patience=5)


def test_a_garbage_last_checkpoint_is_a_run_with_nothing_to_resume(tmp_path):
    best, last = checkpoint_paths(tmp_path, CFG, 0)
    garbage_file(last)
    history = fit(torch.nn.Linear(4, 1), Toy(), Toy(), mse, CFG, tmp_path, progress=False)
    assert history.epoch.tolist() == [0, 1, 2]
    assert last.with_name(last.name + ".corrupt").exists()
    load_best(torch.nn.Linear(4, 1), tmp_path, CFG, 0)


def test_a_half_best_checkpoint_retrains_its_fold_and_inference_names_the_file(tmp_path):
    fit(torch.nn.Linear(4, 1), Toy(), Toy(), mse, CFG, tmp_path, progress=False)
    best, last = checkpoint_paths(tmp_path, CFG, 0)
    half_file(best)
    with pytest.raises(CheckpointError, match=best.name) as error:
        load_best(torch.nn.Linear(4, 1), tmp_path, CFG, 0)
    assert "rerun the notebook" in str(error.value)
    history = fit(torch.nn.Linear(4, 1), Toy(), Toy(), mse, CFG, tmp_path, progress=False)
    assert history.epoch.tolist() == [0, 1, 2]  # trained again, not resumed past its lost best epoch
    load_best(torch.nn.Linear(4, 1), tmp_path, CFG, 0)
    with pytest.raises(CheckpointError, match="not found"):
        load_best(torch.nn.Linear(4, 1), tmp_path, CFG, 1)


def test_a_pretrained_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code_ran"
    evil = code_running_weights(tmp_path / "weights.pt", marker)
    with pytest.raises(ValueError, match="weights.pt: refused"):
        load_pretrained(torch.nn.Linear(1, 1), evil)
    assert not marker.exists()
    with zipfile.ZipFile(evil) as z:  # the file is what it claims: its pickle calls os.system
        pickled = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"system" in pickled and str(marker).encode() in pickled


def test_pretrained_weights_from_safetensors_a_hub_folder_or_a_state_dict(tmp_path):
    from safetensors.torch import save_file

    source = torch.nn.Linear(3, 2)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    snapshot = tmp_path / "models--timm--toy" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    shutil.copy(tmp_path / "model.safetensors", snapshot / "model.safetensors")
    torch.save({"model": source.state_dict()}, tmp_path / "checkpoint.pt")
    for path in (tmp_path / "model.safetensors", tmp_path / "models--timm--toy", tmp_path / "checkpoint.pt"):
        target = torch.nn.Linear(3, 2)
        load_pretrained(target, path)
        assert torch.equal(target.weight, source.weight), path
    with pytest.raises(ValueError, match="not found"):
        read_weights(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        read_weights(garbage_file(tmp_path / "bad.safetensors"))


def test_a_new_run_sets_the_previous_submission_aside(tmp_path):
    (tmp_path / "submission.csv").write_text("row_id,fractured\n")
    kept = set_aside_previous_submission(tmp_path)
    assert kept == tmp_path / "previous_submission.csv" and kept.exists()
    assert not (tmp_path / "submission.csv").exists()
    assert set_aside_previous_submission(tmp_path) is None


def test_fault_injection_finds_a_study_for_every_fault(faulted_smoke):
    data_dir, faults = faulted_smoke
    assert faults.uid.nunique() == len(faults)  # each fault in a study of its own on the smoke data
    assert set(faults.split) == {"train", "test"}
    for row in faults.itertuples():
        assert Path(row.file).exists(), row.fault
    cut = faults[faults.fault.str.startswith("cut")]
    assert all(checked_pixel_length(f) is None for f in cut.file)
    assert {"cut uncompressed slice", "cut JPEG Lossless slice"} <= set(faults.fault)
    assert slice_files(data_dir / "train_images" / faults.uid.iloc[0])
