"""Fracture models: shapes of both forms, the loss equals the metric, a training step, 2.5D sampling, Grad-CAM."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import one_step_lowers_loss
from torch import nn

from kernel_utils.explain.gradcam import cam_box, iou, score_boxes, study_gradcam, vertebra_gradcam
from kernel_utils.metric import TARGETS, competition_loss
from kernel_utils.nets import create_model
from kernel_utils.nets.backbones import timm_backbone
from kernel_utils.nets.fracture_nets import (
    SequenceEncoder,
    StudyCnnLstm,
    VertebraCnnLstm,
    competition_bce,
    masked_slice_bce,
    patient_from_vertebrae,
    vertebra_bce,
    vertebra_slice_loss,
)
from kernel_utils.stages import fracture
from kernel_utils.stages.fracture import (
    cross_validate_fracture,
    fit_patient_head,
    labelled_slices,
    sequence_phase_config,
    slice_phase_config,
    vertebra_samples,
    with_patient_mode,
)
from kernel_utils.stages.fracture_data import (
    FractureDataset,
    crop_box_on_cache,
    crop_slices,
    evenly_spaced,
    slice_targets_of,
    study_sequence,
    study_slice_labels,
    study_slices,
    vertebra_stacks,
)
from kernel_utils.stages.fracture_settings import StudySettings, VertebraSettings, fracture_settings
from kernel_utils.stages.inputs import ExtraSlices, StudyInputs
from kernel_utils.training import checkpoint_paths


@pytest.mark.parametrize("form, shape", [("vertebra", (2, 7, 5, 4, 32, 32)), ("study", (2, 8, 3, 32, 32))])
def test_forward_shapes(form, shape):
    settings = fracture_settings("smoke", form, "resnet10t")
    model = create_model(settings.cfg, shape[-3])
    assert model(torch.rand(shape)).shape == (2, 8)


@pytest.mark.parametrize("form, shape", [("vertebra", (1, 7, 3, 4, 32, 32)), ("study", (1, 4, 3, 32, 32))])
def test_a_backbone_with_a_convolution_after_its_pooling_fits_the_bilstm(form, shape):
    """MobileNetV3's pooled features are 1024 wide, not its num_features (288): the BiLSTM takes what comes out."""
    settings = fracture_settings("smoke", form, "mobilenetv3_small_050")
    assert create_model(settings.cfg, shape[-3])(torch.rand(shape)).shape == (1, 8)


def test_loss_equals_the_competition_metric_on_a_hand_made_batch():
    target = torch.tensor([[1, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 1.0]])
    probs = torch.tensor([[0.8, 0.1, 0.2, 0.1, 0.1, 0.3, 0.6, 0.9], [0.2] * 8,
                          [0.4, 0.7, 0.5, 0.5, 0.1, 0.1, 0.1, 0.6]])
    loss = competition_bce(torch.logit(probs), target)
    uids = list("abc")
    labels = pd.DataFrame(target.numpy(), columns=TARGETS).assign(StudyInstanceUID=uids)
    preds = pd.DataFrame(probs.numpy(), columns=TARGETS).assign(StudyInstanceUID=uids)
    assert float(loss) == pytest.approx(competition_loss(labels, preds), rel=1e-5)


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    settings = VertebraSettings.for_profile("smoke", model="resnet10t")
    model = create_model(settings.cfg, 4)
    x = torch.rand(2, 7, 3, 4, 32, 32)
    target = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1], [0] * 8], dtype=torch.float32)
    before, after = one_step_lowers_loss(model, x, target)
    assert after < before


def test_a_single_vertebra_forward_is_its_column_of_the_study_forward():
    torch.manual_seed(0)
    model = create_model(VertebraSettings.for_profile("smoke", model="resnet10t").cfg, 4).eval()
    x = torch.rand(2, 7, 3, 4, 32, 32)
    with torch.no_grad():
        study = model(x)
        single = model(x[1])  # study 1's seven vertebrae as a batch of seven sequences
    assert study.shape == (2, 8) and single.shape == (7, 1)
    assert torch.allclose(single[:, 0], study[1, :7], atol=1e-5)


def test_vertebra_samples_pair_each_vertebra_with_its_label():
    inputs = [np.full((7, 2, 4, 8, 8), 10 * s, dtype=np.uint8) + np.arange(7, dtype=np.uint8)[:, None, None, None,
                                                                                              None]
              for s in range(2)]
    targets = np.zeros((2, 8), dtype=np.float32)
    targets[1, [2, 7]] = 1  # study 1: C3 fractured
    ds = vertebra_samples(inputs, targets, augment=False, image_channels=3)
    assert len(ds) == 14
    item = ds[7 + 2]  # study 1, C3
    assert item["image"].shape == (2, 4, 8, 8) and item["target"].tolist() == [1.0]
    assert float(item["image"].max()) == pytest.approx(12 / 255)
    assert [float(ds[i]["target"][0]) for i in range(14)] == [0.0] * 9 + [1.0] + [0.0] * 4


def test_vertebra_loss_uses_the_metric_weights():
    logits, target = torch.tensor([[0.0], [0.0], [2.0]]), torch.tensor([[1.0], [0.0], [0.0]])
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")[:, 0]
    assert float(vertebra_bce(logits, target)) == pytest.approx(float((2 * bce[0] + bce[1] + bce[2]) / 4))


def test_the_patient_head_learns_from_frozen_vertebra_features():
    """Features say how bright each vertebra is; the patient is fractured when any vertebra is bright."""
    torch.manual_seed(0)
    model = VertebraCnnLstm(SequenceEncoder(_BrightSpot(), hidden=4))
    rng = np.random.default_rng(0)
    inputs, targets = [], np.zeros((40, 8), dtype=np.float32)
    for s in range(40):
        x = np.zeros((7, 2, 2, 16, 16), dtype=np.uint8)
        if s % 2:
            k = rng.integers(7)
            x[k, :, 0, 4:8, 4:8] = 255
            targets[s, [k, 7]] = 1
        inputs.append(x)
    encoder_before = [p.detach().clone() for p in model.encoder.parameters()]
    losses = fit_patient_head(model, inputs, targets, seed=3, steps=200, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, model.encoder.parameters(), strict=True))
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(np.stack(inputs)).float() / 255))[:, 7].numpy()
    assert p[1::2].min() > p[0::2].max()  # every fractured patient above every healthy one
    again = VertebraCnnLstm(SequenceEncoder(_BrightSpot(), hidden=4))
    again.load_state_dict(model.state_dict())
    assert fit_patient_head(again, inputs, targets, seed=3, steps=200, lr=1e-2) == losses  # seeded: reruns agree


def test_slice_targets_from_boxes_and_negative_studies():
    labels = pd.DataFrame({"StudyInstanceUID": ["boxed", "healthy", "unboxed"], "patient_overall": [1, 0, 1]})
    boxes = pd.DataFrame({"StudyInstanceUID": ["boxed", "boxed"], "slice_number": [12, 14]})
    metas = [{"slice_numbers": np.arange(20, 0, -1), "used": np.array([0, 6, 8, 10])},  # feet first: 20, 14, 12, 10
             {"slice_numbers": np.arange(1, 21), "used": np.array([0, 5, 10, 19])},
             {"slice_numbers": np.arange(1, 21), "used": np.array([0, 5, 10, 19])}]
    t = slice_targets_of(["boxed", "healthy", "unboxed"], metas, labels, boxes)
    assert t[0].tolist() == [0, 1, 1, 0] and t[1].tolist() == [0, 0, 0, 0] and np.isnan(t[2]).all()


def test_per_vertebra_slice_targets_know_healthy_vertebrae_and_boxed_fractures():
    vertebrae = ["boxed", "healthy", "unboxed", "missed"]
    labels = pd.DataFrame({"StudyInstanceUID": vertebrae, **{f"C{k}": [int(k == 2), 0, int(k == 5), int(k == 3)]
                                                              for k in range(1, 8)}, "patient_overall": [1, 0, 1, 1]})
    boxes = pd.DataFrame({"StudyInstanceUID": ["boxed", "boxed", "missed"], "slice_number": [5, 6, 40]})
    used = np.tile(np.arange(7)[:, None] * 3, (1, 3)) + np.arange(3)  # vertebra k samples slices 3k, 3k+1, 3k+2
    metas = [{"slice_numbers": np.arange(1, 22), "used": used} for _ in vertebrae]  # slice i is file i + 1
    t = slice_targets_of(vertebrae, metas, labels, boxes)
    assert t.shape == (4, 7, 3)
    assert t[0, 1].tolist() == [0, 1, 1]  # C2 samples files 4-6; 5 and 6 are boxed
    assert np.nansum(t[0]) == 2 and not np.isnan(t[0]).any()  # every other vertebra is healthy: 0
    assert np.isnan(t[3, 2]).all() and np.isnan(t[3]).sum() == 3  # C3's sampled slices miss its box: unknown
    assert np.isnan(t[2, 4]).all() and np.isnan(t[2]).sum() == 3 and np.nansum(t[2]) == 0  # unboxed C5 unknown
    assert (t[1] == 0).all()


def test_slice_logits_come_with_the_vertebra_logit_and_the_auxiliary_loss_skips_unknown_slices():
    torch.manual_seed(0)
    model = create_model(VertebraSettings.for_profile("smoke", model="resnet10t").cfg, 4).eval()
    x = torch.rand(3, 5, 4, 32, 32)
    with torch.no_grad():
        both = model.vertebra_and_slice_logits(x)
        alone = model(x)
    assert both.shape == (3, 6) and torch.allclose(both[:, :1], alone, atol=1e-5)
    logits = torch.tensor([[0.5, 2.0, -1.0], [-0.5, 0.0, 3.0]])
    batch = {"target": torch.tensor([[1.0], [0.0]]), "slice_target": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}
    known = nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, 0.0, 3.0]), torch.tensor([1.0, 0, 1]))
    assert float(masked_slice_bce(logits[:, 1:], batch["slice_target"])) == pytest.approx(float(known))
    vertebra = float(vertebra_bce(logits[:, :1], batch["target"]))
    assert float(vertebra_slice_loss(logits, batch, 0.5)) == pytest.approx(vertebra + 0.5 * float(known))
    assert float(vertebra_slice_loss(logits, {"target": batch["target"]})) == pytest.approx(vertebra)
    nothing = masked_slice_bce(logits[:, 1:].requires_grad_(), torch.full((2, 2), float("nan")))
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad


def test_the_per_vertebra_form_trains_with_slice_targets_when_given(tmp_path, monkeypatch):
    import kernel_utils.stages.fracture as fracture

    seen = []

    def spy(logits, batch, slice_weight=1.0):
        seen.append((tuple(logits.shape), "slice_target" in batch))
        return vertebra_slice_loss(logits, batch, slice_weight)

    monkeypatch.setattr(fracture, "vertebra_slice_loss", spy)
    rng = np.random.default_rng(0)
    uids = [f"s{i}" for i in range(4)]
    labels = pd.DataFrame({"StudyInstanceUID": uids, **{t: [i % 2 for i in range(4)] for t in TARGETS}})
    inputs = [rng.integers(0, 255, (7, 5, 4, 32, 32), dtype=np.uint8) for _ in uids]
    slice_targets = np.zeros((4, 7, 5), dtype=np.float32)
    slice_targets[[1, 3]] = np.nan
    slice_targets[1, :, 2] = 1  # study 1 is boxed on the middle slice of every vertebra
    slice_targets[1, :, [0, 1, 3, 4]] = 0
    settings = VertebraSettings.for_profile("smoke", model="resnet10t")
    cv = cross_validate_fracture(uids, inputs, labels, settings, tmp_path, progress=False, slice_targets=slice_targets)
    assert cv["raw_oof"].shape == (4, 8) and np.isfinite(cv["raw_oof"]).all()
    assert (settings.cfg.batch_size, 6) in [s for s, with_slices in seen if with_slices]  # training: slice labels
    assert any(not with_slices for _, with_slices in seen)  # validation: the vertebra loss alone
    seen.clear()
    cross_validate_fracture(uids, inputs, labels, settings, tmp_path / "none", progress=False)
    assert not seen  # without slice targets the plain vertebra loss trains


def test_a_frozen_backbone_keeps_its_weights_and_batch_norm_statistics():
    torch.manual_seed(0)
    model = StudyCnnLstm(SequenceEncoder(timm_backbone("resnet10t", 3), hidden=8))
    model.encoder.freeze_backbone()
    model.train()
    backbone = {k: v.clone() for k, v in model.encoder.backbone.state_dict().items()}
    lstm = {k: v.clone() for k, v in model.encoder.lstm.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    competition_bce(model(torch.rand(2, 4, 3, 32, 32)), torch.ones(2, 8)).backward()
    opt.step()
    assert all(torch.equal(v, model.encoder.backbone.state_dict()[k]) for k, v in backbone.items())
    assert not all(torch.equal(v, model.encoder.lstm.state_dict()[k]) for k, v in lstm.items())


def test_the_study_form_trains_its_cnn_on_slices_first(tmp_path):
    rng = np.random.default_rng(0)
    uids = [f"s{i}" for i in range(8)]
    labels = pd.DataFrame({"StudyInstanceUID": uids, **{t: [i % 2 for i in range(8)] for t in TARGETS}})
    inputs = [rng.integers(0, 255, (3, 3, 32, 32), dtype=np.uint8) for _ in uids]
    slice_targets = np.where(np.arange(8)[:, None] % 2, np.nan, 0.0) * np.ones((1, 3))
    slice_targets[[1, 3, 5, 7], 1] = 1  # the fractured studies are boxed on their middle slice
    slice_targets[[1, 3, 5, 7], 0] = 0
    settings = StudySettings.for_profile("smoke", model="resnet10t")
    cv = cross_validate_fracture(uids, inputs, labels, settings, tmp_path, progress=False,
                                 slice_targets=slice_targets)
    assert set(cv["histories"].model) == {"cnn_lstm_study (CNN on slices)", "cnn_lstm_study"}
    for fold in (0, 1):
        for cfg in (settings.cfg, slice_phase_config(settings.cfg), sequence_phase_config(settings)):
            assert checkpoint_paths(tmp_path, cfg, fold)[0].exists()
    assert cv["raw_oof"].shape == (8, 8) and np.isfinite(cv["raw_oof"]).all()


def test_the_study_forms_extra_slices_are_labelled_ones_it_does_not_sample_cropped_as_it_crops():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 48, 48, 3), dtype=np.uint8)
    entry = {"images": images, "slice_numbers": np.arange(101, 121), "crop_box": (8, 88, 16, 80),
             "original_shape": (20, 96, 96)}
    sampled = set(study_slices(20, 5).tolist())  # 0, 5, 10, 14, 19
    labels = np.full(20, np.nan, np.float32)
    labels[[3, 4, 5, 6]] = 1  # slice 5 is sampled already
    labels[[10, 11, 12, 13, 14]] = 0
    labels[[7, 8]] = 1
    boxed = StudySettings.for_profile("smoke", n_slices=5, size=16, slice_labels="all_boxed")
    assert 5 in sampled and boxed.extra_slice_choice(labels).tolist() == [3, 4, 6, 7, 8]  # unsampled fractured
    everything = StudySettings.for_profile("smoke", n_slices=5, size=16, slice_labels="vertebrae", extra_slices=7)
    assert everything.extra_slice_choice(labels).tolist() == [3, 4, 6, 7, 8, 11, 13]  # then healthy ones, evenly
    few = StudySettings.for_profile("smoke", n_slices=5, size=16, slice_labels="vertebrae", extra_slices=3)
    assert few.extra_slice_choice(labels).tolist() == [3, 6, 8]  # evenly spaced over the five fractured ones
    x = boxed.extra_slice_input(entry, np.array([3, 4, 6]))
    crop = crop_box_on_cache(entry)
    assert x.shape == (3, 3, 16, 16) and np.array_equal(x, crop_slices(images, crop, np.array([3, 4, 6]), 16))
    assert np.array_equal(crop_slices(images, crop, study_slices(20, 5), 16), study_sequence(images, crop, 5, 16))
    assert boxed.extra_slice_input(entry, np.array([], int)).shape == (0, 3, 16, 16)
    sampled_only = StudySettings.for_profile("smoke", slice_labels="sampled")
    assert not sampled_only.wants_extra_slices and StudySettings.for_profile("smoke").wants_extra_slices
    assert not StudySettings.for_profile("smoke", train="end_to_end").wants_extra_slices
    assert everything.labels_from_localisation and not boxed.labels_from_localisation
    with pytest.raises(ValueError, match="slice_labels"):
        StudySettings.for_profile("smoke", slice_labels="every")


def test_vertebra_ranges_label_the_slices_of_a_fractured_study_without_boxes():
    numbers = np.arange(30, 10, -1)  # feet first: slice numbers 30 down to 11
    ranges = pd.DataFrame([{"vertebra": f"C{k}", "found": k != 6, "first_slice_number": 12 + 2 * k,
                            "last_slice_number": 13 + 2 * k} for k in range(1, 8)])
    fractured = np.zeros(8, bool)
    fractured[[2, 7]] = True  # C3 and the patient
    z = study_slice_labels(numbers, fractured, set(), ranges)
    assert sorted(numbers[z == 1].tolist()) == [18, 19] and (z[z != 1] == 0).all()  # C3's slice numbers
    fractured[5] = True  # C6 too, which the localisation did not find: its slices could be anywhere else
    z = study_slice_labels(numbers, fractured, set(), ranges)
    assert sorted(numbers[z == 1].tolist()) == [18, 19] and np.isnan(z[z != 1]).all()
    assert np.isnan(study_slice_labels(numbers, fractured, set(), None)).all()  # no ranges: nobody knows
    assert study_slice_labels(numbers, fractured, {25}, ranges).tolist() == (numbers == 25).tolist()  # boxes win
    assert (study_slice_labels(numbers, np.zeros(8, bool), set(), None) == 0).all()  # healthy: 0 everywhere
    labels = pd.DataFrame({"StudyInstanceUID": ["a"], **{t: [int(t in ("C3", "patient_overall"))] for t in TARGETS}})
    metas = [{"slice_numbers": numbers, "used": np.array([0, 11, 12, 19])}]  # numbers 30, 19, 18, 11
    t = slice_targets_of(["a"], metas, labels, pd.DataFrame(columns=["StudyInstanceUID", "slice_number"]),
                         {"a": ranges})
    assert t.tolist() == [[0, 1, 1, 0]]


def _extra_store(tmp_path, arrays: dict[int, np.ndarray]) -> ExtraSlices:
    paths = []
    for i, x in arrays.items():
        paths.append(tmp_path / f"extra{i}.npy")
        np.save(paths[-1], x)
    store = StudyInputs([f"s{i}" for i in arrays], paths, [{} for _ in arrays])
    return ExtraSlices(store, list(arrays), [np.arange(len(x)) % 2 for x in arrays.values()])


def test_extra_slices_join_the_slice_phase_of_their_training_studies_only(tmp_path, monkeypatch):
    extra = _extra_store(tmp_path, {1: np.full((2, 3, 8, 8), 7, np.uint8), 3: np.full((3, 3, 8, 8), 9, np.uint8)})
    ds = extra.samples([0, 1, 2], 3, False)
    assert len(ds) == 2 and [float(ds[i]["target"]) for i in range(2)] == [0, 1] and extra.fractured == 2
    assert extra.samples([0, 2], 3, False) is None
    seen = []
    original = fracture.fit

    def record(model, train_ds, *args, **kwargs):
        seen.append(len(train_ds))
        return original(model, train_ds, *args, **kwargs)

    monkeypatch.setattr(fracture, "fit", record)
    rng = np.random.default_rng(0)
    uids = [f"s{i}" for i in range(8)]
    labels = pd.DataFrame({"StudyInstanceUID": uids, **{t: [i % 2 for i in range(8)] for t in TARGETS}})
    inputs = [rng.integers(0, 255, (3, 3, 32, 32), dtype=np.uint8) for _ in uids]
    slice_targets = np.where(np.arange(8)[:, None] % 2, np.nan, 0.0) * np.ones((1, 3))
    slice_targets[[1, 3, 5, 7]] = (0, 1, 0)  # every fractured study boxed on its middle slice
    extra = _extra_store(tmp_path, {1: rng.integers(0, 255, (4, 3, 32, 32), dtype=np.uint8)})
    settings = StudySettings.for_profile("smoke", model="resnet10t", slice_labels="all_boxed")
    cv = cross_validate_fracture(uids, inputs, labels, settings, tmp_path, progress=False,
                                 slice_targets=slice_targets, extra_slices=extra)
    fold_of_1 = cv["folds"]["s1"]
    known = {k: int((~np.isnan(slice_targets[[i for i, u in enumerate(uids) if cv["folds"][u] != k]])).sum())
             for k in (0, 1)}
    slice_phase = seen[0::2]  # each fold: the slice phase, then the sequence phase
    assert slice_phase == [known[k] + (4 if k != fold_of_1 else 0) for k in (0, 1)]


def test_the_slice_phase_shares_the_study_models_cnn_and_ignores_the_bilstms_settings():
    settings = StudySettings.for_profile("smoke", model="resnet10t")
    model = create_model(settings.cfg, 3)
    assert model.slice_model().backbone is model.encoder.backbone
    other = StudySettings.for_profile("smoke", model="resnet10t", hidden=16, sequence_epochs=3, sequence_lr=1e-2)
    assert slice_phase_config(settings.cfg).run_name == slice_phase_config(other.cfg).run_name  # one CNN for both
    assert sequence_phase_config(settings).run_name != sequence_phase_config(other).run_name
    wider = StudySettings.for_profile("smoke", model="resnet10t", size=48)
    assert slice_phase_config(settings.cfg).run_name != slice_phase_config(wider.cfg).run_name


def test_the_study_forms_sequence_phase_is_named_after_its_slice_phase():
    base = StudySettings.for_profile("demo")
    names = {sequence_phase_config(s).run_name for s in (base, StudySettings.for_profile("demo", epochs=8),
                                                         StudySettings.for_profile("demo", lr=1e-3))}
    assert len(names) == 3  # the same sequence epochs and lr on other frozen features: another run
    assert sequence_phase_config(base).run_name == sequence_phase_config(StudySettings.for_profile("demo")).run_name


def test_the_study_forms_warp_setting_reaches_its_slice_phase():
    inputs = [np.zeros((3, 3, 8, 8), dtype=np.uint8)]
    targets = np.array([[0.0, 1.0, np.nan]])
    for warp in (True, False):
        ds = labelled_slices(inputs, targets, True, 3, warp)
        assert ds.rotate_shift is warp and len(ds) == 2
    assert StudySettings.for_profile("demo").rotate_shift is True  # seed 002's augmentation


def test_vertebra_stacks_pick_the_right_slices_and_channels():
    z_n, s = 40, 32
    images = np.zeros((z_n, s, s, 3), dtype=np.uint8)
    images[..., 1] = np.arange(z_n, dtype=np.uint8)[:, None, None] * 5  # slice z has value 5 z in channel 1
    mask = np.zeros((z_n, s, s), dtype=np.uint8)
    mask[10:20, 8:24, 8:24] = 3
    rows = pd.DataFrame([{"vertebra": f"C{k}", "found": k == 3, "first": 10, "last": 19, "y0": 8, "y1": 24,
                          "x0": 8, "x1": 24} for k in range(1, 8)])
    x, used, boxes = vertebra_stacks(images, mask, rows, n_slices=4, context=1, step=2, crop=16, margin=0.0)
    assert x.shape == (7, 4, 4, 16, 16)
    assert list(used[2]) == [10, 13, 16, 19] and list(evenly_spaced(10, 19, 4)) == [10, 13, 16, 19]
    assert [int(x[2, 1, c].mean()) for c in range(3)] == [5 * 11, 5 * 13, 5 * 15]  # slices 11, 13, 15
    assert x[2, 0, 3].min() == 255 and x[0, 0, 3].max() == 0  # C3's mask fills its box; C1 has none
    assert tuple(boxes[2]) == (8, 24, 8, 24)
    assert list(used[0]) == list(evenly_spaced(0, 4, 4))  # C1 not found: the first of seven even windows
    seq = study_sequence(images, (0, 32, 0, 32), n_slices=5, size=16)
    assert seq.shape == (5, 3, 16, 16) and int(seq[-1, 1].mean()) == 5 * 39


def test_augmentation_keeps_shape_and_mask_channel_values():
    x = np.zeros((7, 3, 4, 16, 16), dtype=np.uint8)
    x[:, :, 3, 4:12, 4:12] = 255
    item = FractureDataset([x], np.zeros((1, 8)), augment=True, image_channels=3)[0]
    assert item["image"].shape == (7, 3, 4, 16, 16) and item["target"].shape == (8,)
    assert float(item["image"][:, :, 3].max()) > 0.9


def test_augmentation_without_rotation_only_flips_and_jitters():
    x = np.random.default_rng(0).integers(0, 255, (3, 4, 16, 16), dtype=np.uint8)
    ds = FractureDataset([x], None, augment=True, image_channels=3, rotate_shift=False)
    seen = set()
    for seed in range(8):
        np.random.seed(seed)
        torch.manual_seed(seed)
        t = ds[0]["image"]
        flipped = torch.equal(t[:, 3], torch.from_numpy(x[:, 3, :, ::-1].copy()).float() / 255)
        assert flipped or torch.equal(t[:, 3], torch.from_numpy(x[:, 3]).float() / 255)  # the mask moves only by a flip
        seen.add(flipped)
    assert seen == {True, False}


def test_augmentation_follows_the_seed():
    x = np.random.default_rng(0).integers(0, 255, (7, 3, 4, 32, 32), dtype=np.uint8)
    ds = FractureDataset([x], None, augment=True, image_channels=3)
    draws = []
    for _ in range(2):
        np.random.seed(5)
        torch.manual_seed(5)
        draws.append(ds[0]["image"])
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], ds[0]["image"])


def test_patient_overall_from_vertebrae():
    p = np.array([[0.1, 0.2, 0, 0, 0, 0, 0, 0.9]])
    assert with_patient_mode(p, "product")[0, 7] == pytest.approx(1 - 0.9 * 0.8)
    assert with_patient_mode(p, "head")[0, 7] == 0.9
    assert float(patient_from_vertebrae(torch.tensor([0.5, 0.5] + [0.0] * 5))) == pytest.approx(0.75)


class _BrightSpot(nn.Module):
    """A stand-in backbone whose feature map is the input's brightness: Grad-CAM must find the bright spot."""

    pooled_features = 1

    def forward_features(self, x):
        return nn.functional.avg_pool2d(x[:, :1], 4)

    def forward_head(self, f, pre_logits=False):
        return f.amax(dim=(2, 3))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_gradcam_box_lands_on_a_planted_activation():
    model = VertebraCnnLstm(SequenceEncoder(_BrightSpot(), hidden=4))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    x = torch.zeros(7, 3, 2, 32, 32)
    x[2, 1, 0, 20:28, 4:12] = 1.0  # a bright patch in C3's second slice
    cams = vertebra_gradcam(model, x, 3)
    assert cams.shape == (3, 32, 32)
    box = cam_box(cams[1])
    assert box is not None
    y0, y1, x0, x1 = box
    assert 16 <= y0 <= 22 and 26 <= y1 <= 32 and 0 <= x0 <= 6 and 10 <= x1 <= 16


def test_study_gradcam_peaks_on_the_slice_and_spot_that_carry_the_signal():
    from kernel_utils.nets.fracture_nets import StudyCnnLstm

    model = StudyCnnLstm(SequenceEncoder(_BrightSpot(), hidden=4))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    x = torch.zeros(5, 2, 32, 32)
    x[3, 0, 4:12, 20:28] = 1.0  # a bright patch on the fourth slice only
    cams = study_gradcam(model, x)
    assert cams.shape == (5, 32, 32) and cams.max() == pytest.approx(1.0)
    assert int(np.argmax(cams.max(axis=(1, 2)))) == 3
    assert cams[[0, 1, 2, 4]].max() < 0.5 * cams[3].max()  # one scale for the study: the empty slices stay dark
    y0, y1, x0, x1 = cam_box(cams[3])
    assert 0 <= y0 <= 6 and 10 <= y1 <= 16 and 16 <= x0 <= 22 and 26 <= x1 <= 32


def test_box_scoring():
    truth = pd.DataFrame({"StudyInstanceUID": ["a", "a"], "slice_number": [5, 6], "x": [10.0, 10.0],
                          "y": [10.0, 10.0], "width": [10.0, 10.0], "height": [10.0, 10.0]})
    pred = pd.DataFrame({"StudyInstanceUID": ["a"], "slice_number": [5], "x": [15.0], "y": [10.0],
                         "width": [10.0], "height": [10.0]})
    assert iou((15, 10, 10, 10), (10, 10, 10, 10)) == pytest.approx(1 / 3)
    scores = score_boxes(pred, truth)
    assert scores["hit_share"] == 0.5 and scores["mean_iou_of_hits"] == pytest.approx(1 / 3)


def test_planned_runs_key_extra_backbones_by_their_predictions():
    import pytest

    from kernel_utils.stages.fracture_settings import planned_runs

    runs = planned_runs("smoke", "vertebra, study", {"vertebra": "", "study": "resnet10t"}, {}, "resnet10t,resnet14t",
                        "a.pt,b.pt")
    assert [key for key, _ in runs] == ["vertebra", "study", "cnn_lstm_vertebra_resnet10t",
                                        "cnn_lstm_vertebra_resnet14t"]
    main, study, first, second = (s for _, s in runs)
    assert (main.variant, main.name, study.cfg.model) == ("", "cnn_lstm_vertebra", "resnet10t")
    assert (second.form, second.cfg.model, second.cfg.pretrained_path) == ("vertebra", "resnet14t", "b.pt")
    assert first.cfg.run_name != main.cfg.run_name
    with pytest.raises(ValueError, match="1 extra weights files for 2 extra backbones"):
        planned_runs("smoke", "vertebra", {}, {}, "resnet10t,resnet14t", "a.pt")
    with pytest.raises(ValueError, match="leave out 'vertebra'"):
        planned_runs("smoke", "study", {}, {}, "resnet10t")
