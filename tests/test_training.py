"""The training loop: run names, DataLoader workers, checkpoints, an interrupted run resumed, a finished one skipped."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernel_utils import training
from kernel_utils.training import TrainConfig, checkpoint_paths, fit, load_best, load_checkpoint, loader_workers

CFG = TrainConfig(stage="toy", model="linear", epochs=4, batch_size=8, lr=1e-2, patience=10, mixed_precision="no")


class Toy(torch.utils.data.Dataset):
    """y = x . w for 64 random x [4]."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])[:, None]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "target": self.y[i]}


def mse(out, batch):
    return torch.nn.functional.mse_loss(out, batch["target"])


def test_run_name_follows_what_is_learned_not_how_fast():
    assert dataclasses.replace(CFG, num_workers=6).run_name == CFG.run_name
    assert dataclasses.replace(CFG, lr=1e-3).run_name != CFG.run_name
    assert dataclasses.replace(CFG, params=(("size", 64),)).run_name != CFG.run_name


def test_a_finished_fold_of_other_data_trains_again_and_one_of_the_same_data_is_kept(tmp_path, caplog):
    steps = {"n": 0}

    def counted(out, batch):
        steps["n"] += torch.is_grad_enabled()
        return mse(out, batch)

    fit(torch.nn.Linear(4, 1), Toy(), Toy(), counted, CFG, tmp_path, progress=False, data_key="masks-a")
    assert steps["n"] == 4 * 8 and load_checkpoint(checkpoint_paths(tmp_path, CFG, 0)[1])["data_key"] == "masks-a"
    steps["n"] = 0
    fit(torch.nn.Linear(4, 1), Toy(), Toy(), counted, CFG, tmp_path, progress=False, data_key="masks-a")
    assert steps["n"] == 0  # the same data: the finished fold is kept
    with caplog.at_level("WARNING"):
        history = fit(torch.nn.Linear(4, 1), Toy(), Toy(), counted, CFG, tmp_path, progress=False,
                      data_key="masks-b")
    assert steps["n"] == 4 * 8 and history.epoch.tolist() == [0, 1, 2, 3]  # notebook 02 changed: trained again
    assert "trained on other data" in caplog.text
    best, last = checkpoint_paths(tmp_path, CFG, 0)
    assert load_checkpoint(last)["data_key"] == load_checkpoint(best)["data_key"] == "masks-b"
    assert training.stored_data_key(last) == "masks-b"  # what the benchmarks read to tell a resumed run
    last.write_bytes(b"not a checkpoint")
    assert training.stored_data_key(last) is None


def test_loader_workers(monkeypatch):
    assert loader_workers(dataclasses.replace(CFG, num_workers=3)) == 3
    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: False)
    assert loader_workers(CFG) == 0  # the CPU's cores go to the model
    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(training.os, "cpu_count", lambda: 16)
    assert loader_workers(CFG) == 8


def test_an_interrupted_run_resumes_where_it_stopped_and_a_finished_one_is_skipped(tmp_path):
    calls = {"n": 0}
    steps_per_epoch = 64 // CFG.batch_size

    def interrupted(out, batch):
        calls["n"] += torch.is_grad_enabled()  # training steps only, not validation batches
        if calls["n"] > 2 * steps_per_epoch:  # killed during the third epoch
            raise KeyboardInterrupt
        return mse(out, batch)

    with pytest.raises(KeyboardInterrupt):
        fit(torch.nn.Linear(4, 1), Toy(), Toy(), interrupted, CFG, tmp_path, progress=False)
    best, last = checkpoint_paths(tmp_path, CFG, 0)
    assert best.exists() and last.exists()
    assert load_checkpoint(last)["epoch"] == 1

    calls["n"] = 0

    def counted(out, batch):
        calls["n"] += torch.is_grad_enabled()
        return mse(out, batch)

    history = fit(torch.nn.Linear(4, 1), Toy(), Toy(), counted, CFG, tmp_path, progress=False)
    assert history.epoch.tolist() == [0, 1, 2, 3]
    assert calls["n"] == 2 * steps_per_epoch  # the steps of epochs 2 and 3 only
    assert history.valid_loss.iloc[-1] < history.valid_loss.iloc[0]

    calls["n"] = 0
    again = fit(torch.nn.Linear(4, 1), Toy(), Toy(), counted, CFG, tmp_path, progress=False)
    assert calls["n"] == 0 and len(again) == 4
    model = load_best(torch.nn.Linear(4, 1), tmp_path, CFG, 0)
    with torch.no_grad():
        best_loss = float(mse(model(Toy().x), {"target": Toy().y}))
    assert best_loss == pytest.approx(history.valid_loss.min(), rel=1e-5)
