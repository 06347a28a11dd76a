"""Time per study of every network at real size (512x512 series, hundreds of slices), and the projection of the
hidden test (about 1,500 studies) against Kaggle's 9-hour limit.

    python -m benchmarks.real_size_timing
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import RESULTS, write_result
from kernel_utils.nets import create_model
from kernel_utils.stages.fracture_settings import StudySettings, VertebraSettings
from kernel_utils.stages.localisation_settings import LocalisationSettings
from kernel_utils.stages.vit import ViTSettings
from kernel_utils.training import device

HIDDEN_TEST_STUDIES = 1500
KAGGLE_LIMIT_HOURS = 9.0


def _time(fn, repeat: int) -> float:
    dev = device()
    fn()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def time_model(model: torch.nn.Module, x: torch.Tensor, repeat: int, train: bool) -> dict[str, float]:
    dev = device()
    model = model.to(dev).to(memory_format=torch.channels_last) if x.ndim == 4 else model.to(dev)
    x = x.to(dev)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    @torch.no_grad()
    def infer():
        model.eval()
        with torch.autocast(**amp):
            model(x)

    out = {"inference_s": _time(infer, repeat)}
    if train:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            model.train()
            with torch.autocast(**amp):
                loss = model(x).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out["train_step_s"] = _time(step, max(repeat // 2, 1))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    rows = {}
    vert = VertebraSettings.for_profile("full")
    rows["cnn_lstm_vertebra"] = {
        "model": vert.model, "input": f"1 study: 7 vertebrae x {vert.n_slices} slices x 4 ch x {vert.crop}^2",
        **time_model(create_model(vert.cfg, 4), torch.rand(1, 7, vert.n_slices, 4, vert.crop, vert.crop),
                     args.repeat, train=True)}
    study = StudySettings.for_profile("full")
    rows["cnn_lstm_study"] = {
        "model": study.model, "input": f"1 study: {study.n_slices} slices x 3 ch x {study.size}^2",
        **time_model(create_model(study.cfg, 3), torch.rand(1, study.n_slices, 3, study.size, study.size),
                     args.repeat, train=True)}
    loc = LocalisationSettings.for_profile("full")
    s = loc.seg_size
    rows["unet3d"] = {"model": "MONAI UNet", "input": f"1 study resampled to {s}^3 x 3 ch",
                      **time_model(create_model(loc.seg_cfg, 3), torch.rand(1, 3, s, s, s), args.repeat, train=True)}
    vit = ViTSettings.for_profile("full")
    rows["vit3d"] = {"model": f"MONAI ViT, {vit.hidden} hidden, {vit.layers} layers",
                     "input": f"1 study: 3 ch x {vit.depth} slices (7 vertebrae) x {vit.size}^2",
                     **time_model(create_model(vit.cfg, 3), torch.rand(1, 3, vit.depth, vit.size, vit.size),
                                  args.repeat, train=True)}
    rows["slice_classifier"] = {"model": loc.slice_cfg.model, "input": "300 slices x 3 ch x 256^2",
                                **time_model(create_model(loc.slice_cfg, 3), torch.rand(300, 3, 256, 256),
                                             args.repeat, train=False)}
    io = json.loads((RESULTS / "io_speed.json").read_text()) if (RESULTS / "io_speed.json").exists() else None
    load_s = None
    if io:  # one core of this machine's CPU: 75% uncompressed, 25% JPEG Lossless, 350 slices a study
        rates = io["syntaxes"]
        load_s = 350 * (0.75 / rates["uncompressed"]["kit_slices_per_s"]
                        + 0.25 / rates["jpeg_lossless"]["kit_slices_per_s"])
    folds = 5
    per_study = {name: r["inference_s"] * folds for name, r in rows.items() if name != "slice_classifier"}
    per_study["load_and_window_one_core"] = load_s or 0.0
    total_h = sum(per_study.values()) * HIDDEN_TEST_STUDIES / 3600
    return write_result(f"real_size_timing_{'gpu' if torch.cuda.is_available() else 'cpu'}", {
        "networks": rows, "folds": folds, "seconds_per_test_study": per_study,
        "hidden_test_projection": {"studies": HIDDEN_TEST_STUDIES, "hours": total_h, "limit_hours": KAGGLE_LIMIT_HOURS,
                                   "note": "every network x 5 folds per study plus loading on one CPU core; "
                                           "measured on this machine's GPU, a P100 is several times slower"}})


if __name__ == "__main__":
    main()
