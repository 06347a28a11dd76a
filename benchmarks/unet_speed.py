"""The 3D UNet's speed on this machine at a profile's size: a training step in MONAI's own layout and in the kit's
channels_last_3d, a forward of batch 1 and of batch 2 (why `segment` runs both flip views at once), and `segment`
on one study, in `benchmarks/results/unet_speed_<profile>_<cpu|gpu>.json`.

    python -m benchmarks.unet_speed --profile demo
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from monai.networks.nets import UNet

from benchmarks.common import write_result
from kernel_utils.nets import create_model
from kernel_utils.stages.localisation_data import dice_ce_loss
from kernel_utils.stages.localisation_settings import LocalisationSettings
from kernel_utils.stages.vertebra_localiser import segment


def _seconds(step, repeats: int) -> float:
    """Mean seconds of `step()` over `repeats` calls after two warm-up calls."""
    step()
    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--slices", type=int, default=110, help="slices of the study `segment` is timed on")
    args = ap.parse_args(argv)
    settings = LocalisationSettings.for_profile(args.profile)
    size, cfg = settings.seg_size, settings.seg_cfg
    target = {"target": torch.randint(0, 8, (settings.seg_batch, 1, size, size, size))}
    cube = torch.rand(settings.seg_batch, 3, size, size, size)
    result = {"profile": args.profile, "seg_size": size, "seg_width": settings.seg_width,
              "seg_batch": settings.seg_batch, "threads": torch.get_num_threads()}
    w = settings.seg_width
    plain = UNet(spatial_dims=3, in_channels=3, out_channels=8, channels=(w, 2 * w, 4 * w, 8 * w), strides=(2, 2, 2),
                 num_res_units=settings.seg_res_units)  # MONAI's own contiguous layout
    for layout, model in (("monai", plain), ("channels_last_3d", create_model(cfg, 3))):
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

        def train_step(model=model, opt=opt):
            loss = dice_ce_loss(model(cube), target)
            loss.backward()
            opt.step()
            opt.zero_grad()

        model.train()
        result[f"train_step_s_{layout}"] = round(_seconds(train_step, args.repeats), 4)
    model = create_model(cfg, 3).eval()
    with torch.no_grad():
        for batch in (1, 2):
            x = torch.rand(batch, 3, size, size, size)
            result[f"forward_s_batch{batch}"] = round(_seconds(lambda x=x: model(x), args.repeats), 4)
    images = np.random.default_rng(0).integers(0, 255, (args.slices, 96, 96, 3), dtype=np.uint8)
    result["segment_s_a_study_2_models"] = round(
        _seconds(lambda: segment([model, model], images, size), max(args.repeats // 2, 1)), 4)
    where = "gpu" if torch.cuda.is_available() else "cpu"
    return write_result(f"unet_speed_{args.profile}_{where}", result)


if __name__ == "__main__":
    main()
