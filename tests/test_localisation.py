"""Vertebra localisation: targets from masks, the ordering rules, model shapes, one training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernel_utils.dev.synthetic import plan_dataset, render_study
from kernel_utils.nets import create_model
from kernel_utils.stages.localisation import accuracy_table
from kernel_utils.stages.localisation_data import (
    SliceDataset,
    VolumeDataset,
    bce_loss,
    best_possible_dice,
    bone_roi,
    dice_ce_loss,
    dice_per_vertebra,
    mask_to_cube,
    probabilities_to_grid,
    random_affine,
    to_cube,
)
from kernel_utils.stages.localisation_settings import LocalisationSettings
from kernel_utils.stages.study_localisation import StudyLocalisation
from kernel_utils.stages.vertebra_localiser import drop_islands, localise_study, segment, write_localisation
from kernel_utils.stages.vertebra_targets import enforce_order, ranges_from_presence, slice_targets


@pytest.fixture(scope="module")
def rendered():
    spec = next(s for s in plan_dataset(6, 0, size=48, seed=3) if not s.duplicated)
    return render_study(spec)


def test_targets_from_a_synthetic_mask_equal_the_truth(rendered):
    presence, fraction = slice_targets(rendered.labels)
    for k in range(1, 8):
        truth = (rendered.labels == k).any(axis=(1, 2))
        assert np.array_equal(presence[:, k - 1], truth)
        assert fraction[:, k - 1].sum() == pytest.approx(1.0)
    ranges = ranges_from_presence(presence)
    centres = [0.5 * sum(ranges[k]) for k in range(1, 8)]
    assert centres == sorted(centres)  # head first: C1 on top
    assert ranges[2][1] > ranges[1][1] and ranges[7][1] > ranges[6][1]  # the dens may rise as high as C1


def test_ordering_rules_repair_swaps_and_gaps():
    ranges = {1: (0, 5), 2: (3, 12), 3: None, 4: (25, 31), 5: (2, 6), 6: (40, 46), 7: (47, 53)}
    fixed, repairs = enforce_order(ranges)
    assert fixed[5] is not None and fixed[3] is not None
    assert any("C5" in r and "dropped" in r for r in repairs)
    centres = [0.5 * sum(fixed[k]) for k in range(1, 8)]
    assert centres == sorted(centres)
    assert fixed[4][1] < 0.5 * sum(fixed[6])  # C5, interpolated, lies between C4 and C6
    assert fixed[4][1] <= fixed[5][0] <= fixed[6][0]


def test_localise_study_rows_follow_the_rules(rendered):
    mask = rendered.labels.copy()
    mask[mask == 4] = 0  # C4 lost by the model
    rows, repairs = localise_study(mask, np.full(8, 0.9), rendered.slice_numbers, (len(mask), 48, 48), None, "test")
    by = {r["vertebra"]: r for r in rows}
    assert all(r["found"] for r in rows) and any("C4" in r for r in repairs)
    assert by["C3"]["last"] <= by["C4"]["first"] <= by["C5"]["first"]
    assert by["C1"]["first_slice_number"] == rendered.slice_numbers[by["C1"]["first"]]
    assert 0 <= by["C2"]["y0"] < by["C2"]["y1"] <= 48


def test_models_train_a_step_and_predict_shapes(rendered, tmp_path):
    settings = LocalisationSettings.for_profile("smoke", slice_model="resnet10t")
    images = np.repeat(rendered.hu[..., None].clip(0, 255).astype(np.uint8), 3, axis=-1)
    study = {"uid": "a", "images": images, "mask": rendered.labels, "presence": slice_targets(rendered.labels)[0]}
    cnn = create_model(settings.slice_cfg, 3)
    batch = torch.utils.data.default_collate([SliceDataset([study])[i] for i in range(8)])
    assert cnn(batch["image"]).shape == (8, 7)
    unet = create_model(settings.seg_cfg, 3)
    vol = VolumeDataset([study], 32)[0]
    assert vol["image"].shape == (3, 32, 32, 32) and vol["target"].shape == (1, 32, 32, 32)
    for model, loss_fn, b in ((cnn, bce_loss, batch),
                              (unet, dice_ce_loss, {k: v[None] for k, v in vol.items()})):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        before = float(loss_fn(model(b["image"]), b).detach())
        for _ in range(3):
            loss = loss_fn(model(b["image"]), b)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(loss_fn(model(b["image"]), b).detach()) < before
    assert unet(vol["image"][None]).shape == (1, 8, 32, 32, 32)


def test_the_unet_is_channels_last_with_monais_weights_and_outputs():
    from monai.networks.nets import UNet

    settings = LocalisationSettings.for_profile("smoke")
    unet = create_model(settings.seg_cfg, 3).eval()
    plain = UNet(spatial_dims=3, in_channels=3, out_channels=8, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                 num_res_units=2).eval()
    unet.load_state_dict(plain.state_dict())  # the same names and shapes as MONAI's own UNet
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)  # kept through load_state_dict
    x = torch.rand(1, 3, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(unet(x), plain(x), atol=1e-5)


def _mean_dice(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.nanmean(list(dice_per_vertebra(pred, true).values())))


def test_cube_targets_align_with_cube_images(rendered):
    labels = np.where(rendered.labels <= 7, rendered.labels, 0)
    cube = mask_to_cube(labels, 16)
    assert int(cube.max()) <= 7 and cube.shape == (16, 16, 16)
    bone = to_cube(((labels > 0) * 255).astype(np.uint8)[..., None], 16)[0] > 0.5  # the same shape as an image
    assert float(((cube > 0) == bone).float().mean()) >= 0.995  # plain "nearest" is shifted: 0.986


def test_random_affine_moves_image_and_mask_together(rendered):
    labels = np.where(rendered.labels <= 7, rendered.labels, 0)
    cube, bone = mask_to_cube(labels, 24), to_cube(((labels > 0) * 255).astype(np.uint8)[..., None], 24)
    same, same_mask = random_affine(bone, cube, shift=0, scale=0, degrees=0)
    assert torch.allclose(same, bone, atol=1e-5) and torch.equal(same_mask, cube)  # no motion: unchanged
    np.random.seed(1)
    moved, moved_mask = random_affine(bone, cube, shift=0.1, scale=0.15, degrees=10)
    assert not torch.equal(moved_mask, cube)
    assert float(((moved[0] > 0.5) == (moved_mask > 0)).float().mean()) >= 0.99  # the labels follow the bone
    assert set(moved_mask.unique().tolist()) <= set(cube.unique().tolist())  # nearest: no blended labels
    ds = VolumeDataset([{"images": ((labels > 0) * 255).astype(np.uint8)[..., None], "mask": labels}], 16,
                       augment=True, affine=True)
    item = ds[0]
    assert item["image"].shape[1:] == (16, 16, 16) and item["target"].shape == (1, 16, 16, 16)


def test_probabilities_to_grid_is_the_trilinear_argmax_in_chunks():
    prob = torch.rand(8, 7, 5, 6)
    shape = (11, 9, 13)
    full = torch.nn.functional.interpolate(prob[None], size=shape, mode="trilinear", align_corners=False)[0]
    assert np.array_equal(probabilities_to_grid(prob, shape, chunk=3), full.argmax(0).to(torch.uint8).numpy())


def test_cube_round_trip_keeps_the_vertebrae(rendered):
    labels = np.where(rendered.labels <= 7, rendered.labels, 0)
    one_hot = torch.nn.functional.one_hot(mask_to_cube(labels, 32), 8).permute(3, 0, 1, 2).float()
    back = probabilities_to_grid(one_hot, labels.shape)
    assert back.shape == labels.shape
    assert _mean_dice(back, labels) >= 0.7  # nearest down and up: 0.33
    assert _mean_dice(labels, labels) == 1.0
    assert best_possible_dice(rendered.labels, 32) == pytest.approx(_mean_dice(back, labels))
    assert best_possible_dice(rendered.labels, 16) < best_possible_dice(rendered.labels, 32)


def test_bone_roi_is_the_grown_otsu_box_inside_the_image():
    entry = {"images": np.zeros((5, 48, 48, 3), np.uint8), "original_shape": (5, 96, 96),
             "crop_box": (20, 60, 40, 60)}  # original pixels: (10, 30, 20, 30) on the 48 px grid
    assert bone_roi(entry, 0.25) == (5, 35, 10, 40)  # the longer side 20 grown to 30, centred
    entry["crop_box"] = (0, 40, 0, 20)
    assert bone_roi(entry, 0.25) == (0, 30, 0, 30)  # pushed inside the image, still square
    assert bone_roi(entry, 5.0) == (0, 48, 0, 48)  # never larger than the image
    assert bone_roi(entry, 0.25, cropped=True) == (0, 48, 0, 48)
    settings = LocalisationSettings.for_profile("smoke", seg_region="bone")
    assert settings.seg_roi(entry) == bone_roi(entry, settings.seg_margin)
    frame = LocalisationSettings.for_profile("smoke", seg_region="frame")
    assert frame.seg_roi(entry) is None
    assert settings.seg_cfg.run_name != frame.seg_cfg.run_name  # checkpoints of one are not read for the other
    with pytest.raises(ValueError, match="seg_region"):
        LocalisationSettings.for_profile("smoke", seg_region="box").seg_roi(entry)


def test_a_cube_cut_from_the_spine_region_resolves_it_finer(rendered):
    labels = np.where(rendered.labels <= 7, rendered.labels, 0)
    _, ys, xs = np.nonzero(labels)
    side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 3
    roi = (int(ys.min()) - 1, int(ys.min()) - 1 + side, int(xs.min()) - 1, int(xs.min()) - 1 + side)
    one_hot = torch.nn.functional.one_hot(mask_to_cube(labels, 16, roi), 8).permute(3, 0, 1, 2).float()
    back = probabilities_to_grid(one_hot, labels.shape, roi=roi)
    assert back.shape == labels.shape
    outside = np.ones(labels.shape[1:], bool)
    outside[roi[0]:roi[1], roi[2]:roi[3]] = False
    assert not back[:, outside].any()  # background outside the region
    assert best_possible_dice(labels, 16, roi) == pytest.approx(_mean_dice(back, labels))
    assert best_possible_dice(labels, 16, roi) > best_possible_dice(labels, 16) + 0.05
    assert to_cube(labels[..., None].astype(np.uint8), 16, roi).shape == (1, 16, 16, 16)


def test_drop_islands_keeps_each_vertebra_to_its_largest_piece():
    prob = torch.full((8, 10, 10, 10), 0.05)
    prob[0] = 0.5
    prob[3, :4, :4, :4] = 0.9  # C3's body
    prob[3, 7:9, 7:9, 7:9] = 0.9  # a stray island of C3
    prob[5, :2, 6:9, :2] = 0.9  # C5, one piece
    before = prob.clone()
    labels = drop_islands(prob).argmax(0)
    assert torch.equal(prob, before)  # a copy
    assert (labels[:4, :4, :4] == 3).all() and (labels[7:9, 7:9, 7:9] == 0).all()
    assert (labels[:2, 6:9, :2] == 5).all() and int((labels == 3).sum()) == 64


class _LeftSideModel(torch.nn.Module):
    """C1 logit 4 on the left half of the cube (low W), -4 on the right, whatever the image: [B, 8, D, D, D]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = x.shape
        logits = torch.zeros(b, 8, d, h, w)
        logits[:, 1] = torch.where(torch.arange(w) < w // 2, 4.0, -4.0)
        return logits


def test_segment_averages_the_left_right_flip():
    images = np.zeros((8, 16, 16, 3), dtype=np.uint8)
    plain = segment(_LeftSideModel(), images, 8, flip=False)[0]
    assert (plain[..., :8] == 1).all() and (plain[..., 9:] != 1).all()  # column 8 blends both sides
    flipped = segment(_LeftSideModel(), images, 8, flip=True)[0]  # C1 averages to 0.44 on both sides, the rest 0.08
    assert (flipped == 1).all()


def test_accuracy_table_matches_hand_count():
    import pandas as pd

    rows = [{"true_C1": t, "rf_C1": r, "cnn_C1": c, **{f"{m}_C{k}": 0.0 for m in ("rf", "cnn") for k in range(2, 8)},
             **{f"true_C{k}": False for k in range(2, 8)}} for t, r, c in
            [(True, 0.9, 0.2), (False, 0.6, 0.1), (True, 0.7, 0.8), (False, 0.1, 0.3)]]
    table = accuracy_table(pd.DataFrame(rows))
    assert table.loc["C1", "Random Forest"] == 0.75 and table.loc["C1", "CNN"] == 0.75
    assert table.loc["Overall", "CNN"] == pytest.approx((0.75 + 6) / 7)


def _ordered_study(rng, length: int = 4):
    """Features that say only what a slice looks like (above C1, C1, C2, a vertebral body, C7, below): C3 to C6
    look alike one slice at a time, only their order tells them apart. Returns x [1, Z, 6], presence [1, Z, 7]."""
    kinds = [0] * rng.integers(2, 10) + [1] * length + [2] * length + [3] * (4 * length) + [4] * length \
        + [5] * rng.integers(2, 10)
    presence = np.zeros((len(kinds), 7), np.float32)
    start = kinds.index(1)
    for k in range(7):
        presence[start + k * length: start + (k + 1) * length, k] = 1
    features = np.eye(6, dtype=np.float32)[kinds] + rng.normal(0, 0.1, (len(kinds), 6)).astype(np.float32)
    return torch.from_numpy(features)[None], torch.from_numpy(presence)[None]


def test_the_sequence_head_tells_alike_slices_apart_by_their_order():
    from kernel_utils.nets.localisation_nets import SliceSequenceHead

    rng = np.random.default_rng(0)
    head = SliceSequenceHead(6, hidden=16, dropout=0.0)
    x, y = _ordered_study(rng)
    assert head(x).shape == (1, x.shape[1], 7)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(200):
        x, y = _ordered_study(rng)
        loss = bce_loss(head(x), {"target": y})
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        held_out = [_ordered_study(rng) for _ in range(5)]
        body = torch.cat([((head(x) > 0) == (y > 0.5))[0, :, 2:6].flatten() for x, y in held_out]).float()
    # one slice at a time the best call for C3..C6 on a body slice is "absent": right 3 times in 4
    assert float(body.mean()) > 0.95


def test_range_errors_and_the_better_source_first():
    import pandas as pd

    from kernel_utils.stages.localisation import range_errors, range_table

    truth = {k: (10 * k, 10 * k + 8) for k in range(1, 8)}
    close = {k: (10 * k + 1, 10 * k + 8) for k in range(1, 8)}
    far = {**{k: (10 * k - 3, 10 * k + 8) for k in range(1, 7)}, 7: None}
    rows = range_errors(close, truth, source="close") + range_errors(far, truth, source="far")
    assert rows[0] == {"source": "close", "vertebra": "C1", "first_error": 1, "last_error": 0}
    table = range_table(pd.DataFrame(rows))
    assert list(table.index) == ["close", "far"]
    assert table.loc["close", "within_1"] == 1.0 and table.loc["far", "missed"] == pytest.approx(1 / 7)
    assert table.loc["far", "first_error"] == 3.0


def test_ranges_from_another_model_keep_the_mask_boxes(rendered):
    mask = rendered.labels
    presence = slice_targets(mask)[0].copy()
    first = int(np.flatnonzero(presence[:, 2])[0])
    presence[first, 2] = False  # the slice model starts C3 one slice lower
    rows, _ = localise_study(mask, np.full(8, 0.9), rendered.slice_numbers, (len(mask), 48, 48), None, "test",
                             presence)
    c3 = next(r for r in rows if r["vertebra"] == "C3")
    from_mask = next(r for r in localise_study(mask, np.full(8, 0.9), rendered.slice_numbers, (len(mask), 48, 48),
                                               None, "test")[0] if r["vertebra"] == "C3")
    assert c3["first"] == from_mask["first"] + 1 and c3["last"] == from_mask["last"]
    assert 0 <= c3["y0"] < c3["y1"] <= 48 and (c3["x0"], c3["x1"]) != (0, 48)


def test_a_mask_written_again_unchanged_keeps_its_file_and_fingerprint(tmp_path):
    mask = np.zeros((6, 8, 8), np.uint8)
    mask[2:4, 2:6, 2:6] = 3
    write_localisation(tmp_path, "s", mask)
    path = tmp_path / "s.npz"
    loc = StudyLocalisation(rows=None, mask_path=path)
    before, stamp = loc.fingerprint(), path.stat().st_mtime_ns
    write_localisation(tmp_path, "s", mask.copy())  # notebook 02 run again, same mask
    assert path.stat().st_mtime_ns == stamp and loc.fingerprint() == before
    mask[5, 0, 0] = 7
    write_localisation(tmp_path, "s", mask)
    assert loc.fingerprint() != before
    with np.load(path) as f:
        assert np.array_equal(f["mask"], mask)
    path.write_bytes(b"PK garbage")  # an unreadable mask file is written again
    write_localisation(tmp_path, "s", mask)
    with np.load(path) as f:
        assert np.array_equal(f["mask"], mask)
