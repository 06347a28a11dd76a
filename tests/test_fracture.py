"""Fracture models: shapes of both forms, the loss equals the metric, a training step, 2.5D sampling, Grad-CAM."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import one_step_lowers_loss
from torch import nn

from kernel_utils.fracture import FractureSettings, with_patient_mode
from kernel_utils.fracture_data import FractureDataset, evenly_spaced, study_sequence, vertebra_stacks
from kernel_utils.fracture_models import (
    SequenceEncoder,
    VertebraCnnLstm,
    competition_bce,
    patient_from_vertebrae,
)
from kernel_utils.gradcam import cam_box, iou, score_boxes, vertebra_gradcam
from kernel_utils.metric import TARGETS, competition_loss
from kernel_utils.models import create_model


@pytest.mark.parametrize("form, shape", [("vertebra", (2, 7, 5, 4, 32, 32)), ("study", (2, 8, 3, 32, 32))])
def test_forward_shapes(form, shape):
    settings = FractureSettings.for_profile("smoke", form, "resnet10t")
    model = create_model(settings.cfg, shape[-3])
    assert model(torch.rand(shape)).shape == (2, 8)


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
    settings = FractureSettings.for_profile("smoke", "vertebra", "resnet10t")
    model = create_model(settings.cfg, 4)
    x = torch.rand(2, 7, 3, 4, 32, 32)
    target = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1], [0] * 8], dtype=torch.float32)
    before, after = one_step_lowers_loss(model, x, target)
    assert after < before


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

    num_features = 1

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


def test_box_scoring():
    truth = pd.DataFrame({"StudyInstanceUID": ["a", "a"], "slice_number": [5, 6], "x": [10.0, 10.0],
                          "y": [10.0, 10.0], "width": [10.0, 10.0], "height": [10.0, 10.0]})
    pred = pd.DataFrame({"StudyInstanceUID": ["a"], "slice_number": [5], "x": [15.0], "y": [10.0],
                         "width": [10.0], "height": [10.0]})
    assert iou((15, 10, 10, 10), (10, 10, 10, 10)) == pytest.approx(1 / 3)
    scores = score_boxes(pred, truth)
    assert scores["hit_share"] == 0.5 and scores["mean_iou_of_hits"] == pytest.approx(1 / 3)
