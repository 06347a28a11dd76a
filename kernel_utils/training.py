"""One training loop for every stage: Accelerate (mixed precision, several GPUs), checkpoints named from the
config (`{run_name}_fold{k}_best.pt` and `_last.pt`, `config.json` beside), resume, early stopping, progress bars.

A stage supplies a model (tensor in, logits out), datasets of dict batches (`image`, `target`, ...) and a
`loss_fn(logits, batch) -> scalar`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kernel_utils.layout import atomic_file, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by every trained stage; a stage's own settings go in `params` (sorted key/value pairs).

    Attributes:
        stage: what is trained, e.g. "slice_classifier", "seg3d", "cnn_lstm", "vit3d".
        model: the backbone or network name (timm name in 2D).
        epochs, batch_size, lr, weight_decay: the optimiser (AdamW, cosine schedule with warm-up).
        patience: epochs without a better validation loss before stopping.
        num_workers: DataLoader worker processes; -1 picks them (see `loader_workers`); not part of run_name.
        mixed_precision: "auto" (bf16 on a GPU, fp32 on the CPU), "no", "bf16" or "fp16".
        pretrained_path: a local weights file for the backbone (a Kaggle dataset); empty: random initialisation.
        max_steps_per_epoch: cap on training steps per epoch (0: no cap), for smoke runs.
        params: stage-specific settings, part of the run name's hash.
    """

    stage: str
    model: str
    epochs: int = 5
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-2
    patience: int = 3
    seed: int = 42
    num_workers: int = -1
    mixed_precision: str = "auto"
    pretrained_path: str = ""
    max_steps_per_epoch: int = 0
    params: tuple[tuple[str, object], ...] = ()

    def param(self, key: str, default=None):
        return dict(self.params).get(key, default)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_name(self) -> str:
        """Derived from every setting: never typed by hand, so it cannot drift from the config."""
        settings = {k: v for k, v in self.to_json().items() if k not in RUNTIME_ONLY}
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{self.stage}_{self.model}_e{self.epochs}_lr{self.lr:g}_{digest}"

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        data = dict(data)
        data["params"] = tuple(tuple(p) for p in data.get("params", ()))
        return cls(**data)


RUNTIME_ONLY = ("num_workers",)  # settings that change how fast a run goes, not what it learns: not in run_name


def loader_workers(cfg: TrainConfig) -> int:
    """DataLoader worker processes: cfg.num_workers when set (>= 0); auto (-1): none on the CPU, where the
    model needs every core, and up to 8 beside a GPU, where augmentation would otherwise starve it."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    return min(8, max((os.cpu_count() or 1) - 1, 0)) if torch.cuda.is_available() else 0


def _seed_worker(worker_id: int) -> None:
    """Distinct numpy streams per DataLoader worker (forked workers would otherwise repeat one augmentation)."""
    np.random.seed(torch.initial_seed() % 2**32)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_paths(out_dir: Path, cfg: TrainConfig, fold: int) -> tuple[Path, Path]:
    base = Path(out_dir) / f"{cfg.run_name}_fold{fold}"
    return base.with_name(base.name + "_best.pt"), base.with_name(base.name + "_last.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back; the message names the file and what to do."""


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint the kit wrote, loaded on the CPU with `weights_only=True` (tensors and plain containers only:
    a file that would run code is refused). CheckpointError names the file when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # half written, garbage, or a pickle of something other than tensors
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this kit (no 'model' weights)")
    return state


def stored_data_key(path: str | os.PathLike) -> str | None:
    """The `data_key` a checkpoint was saved with ("" before keys were kept), None when it cannot be read; the
    file is memory-mapped, not read whole."""
    try:
        return str(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("data_key", ""))
    except Exception:  # unreadable or not a dict: nothing `fit` would resume
        return None


def _set_aside(path: Path, why: str) -> None:
    """Keep an unreadable checkpoint as `<name>.corrupt` (nothing is deleted) and say so."""
    path.replace(path.with_name(path.name + ".corrupt"))
    log.warning("%s; kept as %s.corrupt", why, path.name)


def _readable_checkpoints(best_path: Path, last_path: Path) -> dict | None:
    """The `_last.pt` state to resume from, or None to train from scratch. An unreadable `_last.pt` is a run with
    nothing to resume; an unreadable `_best.pt` loses the best epoch, so both are set aside and the fold retrains."""
    last = None
    if last_path.exists():
        try:
            last = load_checkpoint(last_path)
        except CheckpointError as e:
            _set_aside(last_path, f"{e}: training this fold from scratch")
    if best_path.exists():
        try:
            load_checkpoint(best_path)
        except CheckpointError as e:
            _set_aside(best_path, f"{e}: training this fold from scratch")
            if last_path.exists():
                _set_aside(last_path, f"{last_path}: set aside with its unreadable _best.pt")
            last = None
    return last


def atomic_save(obj, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def save_config(out_dir: Path, cfg: TrainConfig) -> Path:
    path = Path(out_dir) / f"{cfg.run_name}_config.json"
    write_json(path, cfg.to_json())
    return path


def fit(model: torch.nn.Module, train_ds: Dataset, valid_ds: Dataset | None, loss_fn: Callable, cfg: TrainConfig,
        out_dir: str | os.PathLike, fold: int = 0, collate_fn: Callable | None = None,
        progress: bool = True, forward: Callable | None = None, data_key: str = "") -> pd.DataFrame:
    """Train with early stopping; resume from `_last.pt` when present. Returns the history (one row an epoch).
    `forward` (a bound method of the model) gives the outputs `loss_fn` takes instead of the model's own forward.
    `data_key` names the training data (e.g. `data_fingerprint` of the inputs and labels): a checkpoint saved with
    another key was trained on other data (notebook 02 localised again, labels changed) and is not resumed; the fold
    trains from scratch."""
    out_dir = Path(out_dir)
    save_config(out_dir, cfg)
    best_path, last_path = checkpoint_paths(out_dir, cfg, fold)
    seed_everything(cfg.seed + fold)
    acc = _accelerator(cfg)
    workers = loader_workers(cfg)
    parallel = dict(num_workers=workers, worker_init_fn=_seed_worker, persistent_workers=workers > 0)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate_fn,
                        drop_last=len(train_ds) > cfg.batch_size, **parallel)
    valid_loader = DataLoader(valid_ds, batch_size=cfg.batch_size, collate_fn=collate_fn, **parallel) \
        if valid_ds is not None and len(valid_ds) else None
    steps = len(loader) if not cfg.max_steps_per_epoch else min(len(loader), cfg.max_steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(cfg.epochs * steps, 1)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    history: list[dict] = []
    start_epoch, best, stale = 0, float("inf"), 0
    state = _readable_checkpoints(best_path, last_path)
    if state is not None and data_key and state.get("data_key", "") != data_key:
        log.warning("%s fold %d: its checkpoint %s was trained on other data (the inputs or labels changed since); "
                    "training this fold from scratch", cfg.run_name, fold, last_path.name)
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history, start_epoch = state["history"], state["epoch"] + 1
        best, stale = state["best"], state["stale"]
        log.info("resuming %s fold %d at epoch %d", cfg.run_name, fold, start_epoch)
    model, optimizer, loader, schedule = acc.prepare(model, optimizer, loader, schedule)
    run = forward or model
    if valid_loader is not None:
        valid_loader = acc.prepare(valid_loader)
    for epoch in range(start_epoch, cfg.epochs):
        if stale >= cfg.patience:
            break
        start = time.perf_counter()
        model.train()
        losses = []
        bar = tqdm(loader, total=steps, desc=f"{cfg.stage} fold {fold} epoch {epoch}", disable=not progress,
                   leave=False)
        for step, batch in enumerate(bar):
            if step >= steps:
                break
            with acc.autocast():
                loss = loss_fn(run(batch["image"]), batch)
            acc.backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "lr": float(optimizer.param_groups[0]["lr"]), "seconds": time.perf_counter() - start,
               "train_items_per_s": len(losses) * cfg.batch_size / max(time.perf_counter() - start, 1e-9)}
        if valid_loader is not None:
            row["valid_loss"] = evaluate_loss(model, valid_loader, loss_fn, acc, forward)
        history.append(row)
        score = row.get("valid_loss", row["train_loss"])
        improved = score < best
        if improved:
            best, stale = score, 0
            atomic_save({"model": acc.unwrap_model(model).state_dict(), "config": cfg.to_json(), "epoch": epoch,
                         "score": score, "data_key": data_key}, best_path)
        else:
            stale += 1
        atomic_save({"model": acc.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "history": history, "epoch": epoch, "best": best,
                     "stale": stale, "config": cfg.to_json(), "data_key": data_key}, last_path)
    return pd.DataFrame(history)


@torch.no_grad()
def evaluate_loss(model, loader, loss_fn, acc=None, forward: Callable | None = None) -> float:
    model.eval()
    run = forward or model
    total, n = 0.0, 0
    for batch in loader:
        ctx = acc.autocast() if acc is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = loss_fn(run(batch["image"]), batch)
        k = len(batch["image"])
        total += float(loss) * k
        n += k
    return total / max(n, 1)


def load_best(model: torch.nn.Module, out_dir: str | os.PathLike, cfg: TrainConfig, fold: int) -> torch.nn.Module:
    """The fold's best weights into `model` (on the CPU; move it where it will run).

    Raises:
        CheckpointError: the file is missing or unreadable; the message names it and what to do.
    """
    best_path, _ = checkpoint_paths(Path(out_dir), cfg, fold)
    if not best_path.exists():
        raise CheckpointError(f"{best_path}: not found; train fold {fold} of {cfg.run_name} first (its notebook "
                              f"resumes the folds already trained)")
    try:
        state = load_checkpoint(best_path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Delete it (and its _last.pt) and rerun the notebook that trains "
                              f"{cfg.stage}: fold {fold} is trained again, the other folds are kept") from e
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, ds: Dataset, batch_size: int = 32, collate_fn: Callable | None = None,
            dev: torch.device | None = None, forward: Callable | None = None) -> np.ndarray:
    """Sigmoid-free raw outputs (logits) of `model` over a dataset, stacked on axis 0, as float32 numpy;
    `forward` (e.g. a bound method of the model that returns features) instead of the model's own forward."""
    dev = dev or device()
    model = model.to(dev).eval()
    run = forward or model
    outs = []
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collate_fn):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            outs.append(run(batch["image"].to(dev)).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0,))
