"""`make bench`: every benchmark of the kit, results in benchmarks/results/*.json.

    python -m benchmarks.run_all --profile bench [--only io_speed,faults,localisation,fracture,timing,ensemble]

The quality benchmarks train models on the profile's synthetic dataset: minutes on a GPU, hours on 2 CPU cores.
"""

from __future__ import annotations

import argparse

from benchmarks import ensemble_inference, faults, fracture_quality, io_speed, localisation_quality, real_size_timing


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="bench")
    ap.add_argument("--only", default="io_speed,faults,localisation,fracture,timing,ensemble")
    args = ap.parse_args(argv)
    chosen = set(args.only.split(","))
    if "io_speed" in chosen:
        io_speed.main([])
    if "faults" in chosen:
        faults.main([])
    if "localisation" in chosen:
        localisation_quality.main(["--profile", args.profile])
    if "fracture" in chosen:
        fracture_quality.main(["--profile", args.profile, "--localisation", "truth"])
    if "timing" in chosen:
        real_size_timing.main([])
    if "ensemble" in chosen:
        ensemble_inference.main(["--profile", args.profile])


if __name__ == "__main__":
    main()
