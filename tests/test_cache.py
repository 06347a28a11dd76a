"""The npz cache: keys, contents, atomic writes, corrupt entries rebuilt, reruns skipped, shards."""

from __future__ import annotations

import dataclasses
import zipfile
import zlib

import numpy as np
import pandas as pd
import pytest

from kernel_utils import load_study
from kernel_utils.io import cache as cache_mod
from kernel_utils.io import cache_build, npz_store
from kernel_utils.io.cache import CacheSpec, cache_dir, load_cached, read_entry, window_study
from kernel_utils.io.cache_build import build_cache
from kernel_utils.io.dicom_series import Rescale
from kernel_utils.io.windowing import (
    SEED002_WINDOWS,
    SliceWindower,
    Window,
    bone_thumbnails,
    otsu_crop_box,
    resize_slices,
    window,
)

SPEC = CacheSpec(image_size=32)


def test_key_changes_with_every_parameter():
    base = CacheSpec()
    variants = [dataclasses.replace(base, image_size=128), dataclasses.replace(base, crop=True),
                dataclasses.replace(base, compress=True),
                dataclasses.replace(base, windows=SEED002_WINDOWS[:2]),
                dataclasses.replace(base, windows=(Window("soft_tissue", 81, 300), *SEED002_WINDOWS[1:]))]
    keys = {base.key, *(v.key for v in variants)}
    assert len(keys) == 1 + len(variants)
    assert CacheSpec().key == base.key


def test_key_changes_with_the_version(monkeypatch):
    before = CacheSpec().key
    monkeypatch.setattr(cache_mod, "CACHE_VERSION", cache_mod.CACHE_VERSION + 1)
    assert CacheSpec().key != before


def test_entry_holds_windows_of_the_hu_and_the_aligned_mask(smoke_dir, tmp_path):
    truth = pd.read_csv(smoke_dir / "_truth" / "studies.csv")
    row = truth[truth.segmented].iloc[0]
    study_dir = smoke_dir / "train_images" / row.uid
    native = CacheSpec(image_size=None)
    entry = load_cached(tmp_path, native, study_dir, smoke_dir / "segmentations" / f"{row.uid}.nii")
    study = load_study(study_dir)
    for c, w in enumerate(SEED002_WINDOWS):
        assert np.array_equal(entry["images"][..., c], window(study.hu, w.level, w.width))
    assert np.array_equal(entry["mask"], np.load(smoke_dir / "_truth" / f"{row.uid}.npz")["labels"])
    assert np.array_equal(entry["slice_numbers"], study.slice_numbers)
    small = load_cached(tmp_path, SPEC, study_dir)
    assert small["images"].shape == (len(study.z), 32, 32, 3) and small["images"].dtype == np.uint8
    assert small["spacing"][1] == pytest.approx(study.spacing[1] * study.hu.shape[1] / 32)
    (cache_dir(tmp_path, native) / "spec.json").read_text().index('"image_size": null')


def test_windowing_as_read_equals_windowing_the_loaded_hu_for_every_quirk(smoke_dir):
    truth = pd.read_csv(smoke_dir / "_truth" / "studies.csv")
    windower = SliceWindower(SEED002_WINDOWS)
    for row in truth.itertuples():
        study_dir = smoke_dir / f"{row.split}_images" / row.uid
        study = load_study(study_dir)
        entry = window_study(study_dir, CacheSpec(image_size=None))
        expected = np.stack([windower(s) for s in study.hu])
        assert np.array_equal(entry["images"], expected), row.encoding
        assert np.array_equal(entry["z"], study.z) and np.array_equal(entry["slice_numbers"], study.slice_numbers)
        y0, y1, x0, x1 = entry["crop_box"]
        assert 0 <= y0 < y1 <= study.hu.shape[1] and 0 <= x0 < x1 <= study.hu.shape[2]
        cropped = window_study(study_dir, CacheSpec(image_size=24, crop=True))
        assert np.array_equal(cropped["crop_box"], entry["crop_box"])
        assert np.array_equal(cropped["images"], resize_slices(expected[:, y0:y1, x0:x1], 24))


def test_crop_box_from_the_stream_matches_the_volume_box_for_every_quirk(smoke_dir):
    truth = pd.read_csv(smoke_dir / "_truth" / "studies.csv")
    assert truth["reversed"].any() and truth["duplicated"].any()
    for row in truth.itertuples():
        study_dir = smoke_dir / f"{row.split}_images" / row.uid
        hu = load_study(study_dir).hu
        box = otsu_crop_box(hu)
        assert tuple(window_study(study_dir, SPEC)["crop_box"]) == box, row.encoding
        assert otsu_crop_box(hu[::-1]) == box == otsu_crop_box(hu[np.random.default_rng(0).permutation(len(hu))])


def test_crop_box_holds_the_bone_and_leaves_out_the_air():
    hu = np.full((20, 64, 80), -1000, dtype=np.int16)
    hu[:, 20:40, 30:50] = 700  # a bone column on every slice
    hu[0, 0:4, 0:4] = 1500  # a bright speck on one slice only
    y0, y1, x0, x1 = otsu_crop_box(hu, margin=0.0, square=False)
    assert (y0, y1, x0, x1) == (20, 40, 32, 52)  # every 4th pixel: x 32..48 sampled -> 32..52


@pytest.mark.parametrize("compress", [False, True])
def test_streamed_npz_reads_back_as_what_was_written(tmp_path, compress):
    volume = np.arange(5 * 6 * 7 * 3, dtype=np.uint8).reshape(5, 6, 7, 3)
    arrays = {"images": volume[::-1], "z": np.linspace(0, 1, 5), "picked": volume[[0, 3]],
              "empty": np.zeros((0, 4), np.int16), "meta": np.array('{"uid": "1.2"}')}
    path = tmp_path / "entry.npz"
    with open(path, "wb") as f:
        npz_store.write_npz(f, arrays, compress)
    with np.load(path) as npz:
        assert sorted(npz.files) == sorted(arrays)
        for name, value in arrays.items():
            assert npz[name].dtype == value.dtype and np.array_equal(npz[name], value), name
    assert zipfile.crc32 is zlib.crc32  # the fast CRC of the write is swapped back
    with zipfile.ZipFile(path) as z:  # the checksums written hold for zlib's CRC-32
        assert z.testzip() is None
        for info in z.infolist():
            assert info.CRC == zlib.crc32(z.read(info.filename)), info.filename
    entry = tmp_path / "entry_atomic.npz"  # write_npz_atomic (preallocated when stored): no byte past the zip's end
    npz_store.write_npz_atomic(entry, arrays, compress)
    assert entry.stat().st_size == path.stat().st_size
    with np.load(entry) as npz:
        assert all(np.array_equal(npz[name], value) for name, value in arrays.items())
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("n_windows", [1, 2, 3, 4])
def test_windower_channels_equal_each_window_and_are_never_its_reused_buffer(n_windows):
    windows = (*SEED002_WINDOWS, Window("brain", 40, 80))[:n_windows]
    rng = np.random.default_rng(n_windows)
    slices = rng.integers(-1200, 2500, (2, 24, 20)).astype(np.int16)
    windower = SliceWindower(windows)
    first, second = windower(slices[0]), windower(slices[1])  # the second call reuses the look-up buffer
    for hu, result in zip(slices, (first, second), strict=True):
        assert result.shape == (24, 20, n_windows)
        for c, w in enumerate(windows):
            assert np.array_equal(result[..., c], window(hu, w.level, w.width)), (n_windows, c)
    out = np.zeros((12, 10, n_windows), np.uint8)
    assert windower(slices[0], 12, 10, out=out) is out and out.any()


@pytest.mark.parametrize("rescale", [Rescale(True, 16, 1.0, -1024.0), Rescale(False, 12, 1.0, -1024.0),
                                     Rescale(True, 12, 1.0, 0.0), Rescale(False, 16, 1.0, 0.0),
                                     Rescale(True, 16, 0.5, -1000.0), Rescale(False, 16, 1.0, -1024.0)])
def test_stored_table_equals_windowing_the_rescaled_hu(rescale):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 65536, (40, 40), dtype=np.uint16)  # every bit pattern, high bits set too
    raw = raw.view(np.int16) if rescale.signed else raw
    windower = SliceWindower(SEED002_WINDOWS)
    assert np.array_equal(windower(raw, rescale=rescale), windower(rescale.to_hu(raw)))
    assert np.array_equal(windower(raw, 16, 16, rescale=rescale), windower(rescale.to_hu(raw), 16, 16))
    expected = bone_thumbnails(rescale.to_hu(raw))  # 10x10: every 4th pixel's gross-bone window
    for windows in (SEED002_WINDOWS, SEED002_WINDOWS[:2]):  # from the packed channel, and by its own table
        windower = SliceWindower(windows)
        thumb, thumb_alone = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
        windower(raw, 16, 16, rescale=rescale, bone_thumb=thumb)
        windower.bone_thumbnail(raw, thumb_alone, rescale)
        assert np.array_equal(thumb, expected) and np.array_equal(thumb_alone, expected), windows
        assert expected.std() > 0


def test_rerun_skips_and_shards_partition(smoke_dir, tmp_path):
    first = build_cache(smoke_dir, tmp_path, "train", SPEC, workers=2, shard="1/2", progress=False)
    second = build_cache(smoke_dir, tmp_path, "train", SPEC, workers=1, shard="2/2", progress=False)
    assert set(first.status) == {"built"} and set(second.status) == {"built"}
    assert not set(first.StudyInstanceUID) & set(second.StudyInstanceUID)
    again = build_cache(smoke_dir, tmp_path, "train", SPEC, workers=1, progress=False)
    assert len(again) == len(first) + len(second) and set(again.status) == {"cached"}
    assert again.n_slices.sum() == first.n_slices.sum() + second.n_slices.sum()


def test_killed_write_leaves_nothing_served(smoke_dir, tmp_path, monkeypatch):
    uid = sorted(p.name for p in (smoke_dir / "train_images").iterdir())[0]

    def dying_write(f, arrays, compress=False):
        f.write(b"PK\x03\x04 half of a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(npz_store, "write_npz", dying_write)
    with pytest.raises(KeyboardInterrupt):
        npz_store.write_npz_atomic(cache_dir(tmp_path, SPEC) / f"{uid}.npz", {"images": np.zeros(3)})
    assert list(cache_dir(tmp_path, SPEC).glob("*.npz")) == []
    assert list(cache_dir(tmp_path, SPEC).glob(".*tmp")) == []
    monkeypatch.undo()
    (cache_dir(tmp_path, SPEC) / f"{uid}.npz").write_bytes(b"PK\x03\x04 truncated by a crash elsewhere")
    summary = build_cache(smoke_dir, tmp_path, "train", SPEC, workers=1, uids=[uid], progress=False)
    assert list(summary.status) == ["built"]
    assert read_entry(cache_dir(tmp_path, SPEC) / f"{uid}.npz")["images"].shape[1:] == (32, 32, 3)


def test_corrupt_entry_is_rebuilt(smoke_dir, tmp_path):
    uid = sorted(p.name for p in (smoke_dir / "train_images").iterdir())[1]
    study_dir = smoke_dir / "train_images" / uid
    good = load_cached(tmp_path, SPEC, study_dir)
    path = cache_dir(tmp_path, SPEC) / f"{uid}.npz"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(b ^ 0xFF for b in data[middle: middle + 64])  # flipped bits in images
    path.write_bytes(bytes(data))
    with pytest.raises(cache_mod.CacheEntryCorrupt):
        read_entry(path)
    again = load_cached(tmp_path, SPEC, study_dir)
    assert np.array_equal(again["images"], good["images"])


def test_bad_shard_is_a_clear_error():
    with pytest.raises(ValueError, match="k/n"):
        cache_build.parse_shard("2")
    with pytest.raises(ValueError, match="between 1 and n"):
        cache_build.parse_shard("3/2")
