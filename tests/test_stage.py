"""The stage contract's pieces: typed settings and their profiles, the input store, the work folder's layout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kernel_utils.io.cache import iter_cached, profile_cache_spec
from kernel_utils.io.cache_build import build_cache
from kernel_utils.layout import WorkLayout, atomic_file
from kernel_utils.stages import inputs as inputs_module
from kernel_utils.stages.fracture_settings import StudySettings, VertebraSettings, fracture_settings
from kernel_utils.stages.inputs import Views, build_inputs, data_fingerprint, input_key
from kernel_utils.stages.localisation_settings import LocalisationSettings
from kernel_utils.stages.stage import FORMS, settings_from_meta
from kernel_utils.stages.study_localisation import StudyLocalisation
from kernel_utils.stages.vit import ViTSettings


@pytest.mark.parametrize("cls", [VertebraSettings, StudySettings, ViTSettings, LocalisationSettings])
def test_profiles_override_the_defaults_and_survive_json(cls):
    full = cls.for_profile("full")
    assert full == cls()  # the defaults are the full profile
    for profile, overrides in cls.PROFILES.items():
        settings = cls.for_profile(profile)
        assert all(getattr(settings, k) == v for k, v in overrides.items())
        back = cls.from_json(settings.to_json())
        assert back == settings
        if hasattr(settings, "params"):
            assert back.cfg.run_name == settings.cfg.run_name
    with pytest.raises(ValueError, match="profile must be one of"):
        cls.for_profile("huge")


def test_empty_overrides_keep_the_profile_and_params_follow_the_fields():
    assert VertebraSettings.for_profile("demo", model="", pretrained_path="") == VertebraSettings.for_profile("demo")
    chosen = VertebraSettings.for_profile("demo", model="resnet10t", crop=40)
    assert chosen.cfg.model == "resnet10t" and dict(chosen.cfg.params)["crop"] == 40
    assert chosen.cfg.run_name != VertebraSettings.for_profile("demo", model="resnet10t").cfg.run_name
    assert "n_folds" not in dict(chosen.cfg.params) and "epochs" not in dict(chosen.cfg.params)
    assert fracture_settings("smoke", "study").form == "study"
    with pytest.raises(ValueError, match="form must be one of"):
        fracture_settings("smoke", "slab")
    meta = {"form": "vit", "settings": ViTSettings.for_profile("demo", volume="study").to_json()}
    assert settings_from_meta(meta) == ViTSettings.for_profile("demo", volume="study")
    assert set(FORMS) == {"vertebra", "study", "vit"}


def test_views_read_only_the_part_asked_for(tmp_path):
    arrays = [np.arange(7 * 2 * 3, dtype=np.uint8).reshape(7, 2, 3) + i for i in range(3)]
    paths = []
    for i, x in enumerate(arrays):
        path = tmp_path / f"{i}.npy"
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.save(f, x)
        paths.append(path)
    store = inputs_module.StudyInputs(["a", "b", "c"], paths, [{}, {}, {}])
    blocks = Views(store, [(i, k) for i in range(3) for k in range(7)], VertebraSettings.vertebra_block)
    assert len(blocks) == 21 and np.array_equal(blocks[9], arrays[1][2])
    assert isinstance(blocks.view(9), np.memmap)  # mapped, not read
    assert not isinstance(blocks[9], np.memmap) and blocks[9].flags.writeable  # copied out, the map let go
    assert [x.tolist() for x in store] == [x.tolist() for x in arrays]
    assert np.array_equal(store.subset([2])[0], arrays[2])


@pytest.fixture(scope="module")
def smoke_work(smoke_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("stage_work")
    spec = profile_cache_spec("smoke")
    build_cache(smoke_dir, work, "train", spec, workers=1, progress=False)
    return work, spec


def test_the_input_store_builds_once_rebuilds_what_changed(smoke_dir, smoke_work, monkeypatch):
    work, spec = smoke_work
    settings = VertebraSettings.for_profile("smoke")
    loads = []
    original = inputs_module.load_cached
    monkeypatch.setattr(inputs_module, "load_cached", lambda *a, **k: loads.append(a[2]) or original(*a, **k))
    first = build_inputs(smoke_dir, work, spec, settings, "train", progress=False)
    assert len(loads) == len(first) > 0
    entries = {uid: e for _, uid, e in iter_cached(smoke_dir, work, spec, ("train",))}
    direct, meta = settings.study_input(entries[first.uids[0]], StudyLocalisation())
    assert np.array_equal(first[0], direct) and first[0].shape == (7, 5, 4, 32, 32)
    assert np.array_equal(first.metas[0]["used"], meta["used"])
    before = [np.array(x) for x in first]
    loads.clear()
    again = build_inputs(smoke_dir, work, spec, settings, "train", progress=False)
    assert not loads and again.uids == first.uids  # every input reused, no cache entry read
    targets = np.zeros((len(first), 8), np.float32)
    key = data_fingerprint(first, targets)
    assert data_fingerprint(again, targets) == key  # nothing rebuilt: fold checkpoints are resumed
    targets[0, 7] = 1
    assert data_fingerprint(again, targets) != key  # a label changed
    targets[0, 7] = 0
    first.paths[1].write_bytes(b"\x93NUMPY garbage")  # a half-written input is built again
    layout = WorkLayout(work)  # notebook 02 localises one study: that study's input is built again
    uid = first.uids[2]
    rows = pd.DataFrame([{"StudyInstanceUID": uid, "vertebra": f"C{k}", "found": True, "first": 2 * k,
                          "last": 2 * k + 1, "y0": 10, "y1": 40, "x0": 10, "x1": 40} for k in range(1, 8)])
    layout.localisation.mkdir(parents=True, exist_ok=True)
    rows.to_csv(layout.vertebrae, index=False)
    third = build_inputs(smoke_dir, work, spec, settings, "train", progress=False)
    assert sorted(loads) == sorted([smoke_dir / "train_images" / first.uids[1], smoke_dir / "train_images" / uid])
    assert not np.array_equal(third[2], before[2]) and np.array_equal(third[3], before[3])
    assert np.array_equal(third[1], before[1])
    assert data_fingerprint(third, targets) != key  # inputs rebuilt: the folds train again
    assert input_key(StudySettings.for_profile("smoke"), spec) != input_key(settings, spec)


def test_the_extra_slice_store_builds_once_rebuilds_what_changed(smoke_dir, smoke_work, monkeypatch):
    work, spec = smoke_work
    settings = StudySettings.for_profile("smoke")
    assert settings.wants_extra_slices
    entries = {uid: e for _, uid, e in iter_cached(smoke_dir, work, spec, ("train",))}
    uids = sorted(entries)[:3]
    labels = [np.zeros(len(entries[u]["images"]), np.float32) for u in uids]
    labels[0][::2] = 1.0
    loads = []
    original = inputs_module.load_cached
    monkeypatch.setattr(inputs_module, "load_cached", lambda *a, **k: loads.append(a[2]) or original(*a, **k))
    first = inputs_module.extra_slice_inputs(smoke_dir, work, spec, settings, uids, labels, progress=False)
    chosen = [settings.extra_slice_choice(z) for z in labels]
    assert first.owners == [i for i, zs in enumerate(chosen) if len(zs)] and len(loads) == len(first.owners) > 0
    zs = chosen[0]
    assert 0 < len(zs) <= settings.extra_slices and labels[0][zs].sum() > 0
    assert np.array_equal(first.store[0], settings.extra_slice_input(entries[uids[0]], zs))
    assert first.fractured == int(sum(labels[i][chosen[i]].sum() for i in first.owners))
    samples = first.samples([0], settings.image_channels(3), settings.rotate_shift)
    assert len(samples) == len(zs) and samples.targets[:, 0].tolist() == labels[0][zs].tolist()
    loads.clear()
    again = inputs_module.extra_slice_inputs(smoke_dir, work, spec, settings, uids, labels, progress=False)
    assert not loads and np.array_equal(again.store[0], first.store[0])  # reused, no cache entry read
    labels[1][::3] = 1.0  # new labels for one study, a broken file for another: only those two are built again
    first.store.paths[-1].write_bytes(b"\x93NUMPY garbage")
    third = inputs_module.extra_slice_inputs(smoke_dir, work, spec, settings, uids, labels, progress=False)
    assert sorted(map(str, loads)) == sorted(str(smoke_dir / "train_images" / uids[i]) for i in {1, first.owners[-1]})
    assert third.targets[1].sum() > 0 and np.array_equal(third.store[0], first.store[0])
