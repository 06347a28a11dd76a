"""Building the cache of a whole split: worker processes, shards across machines, and a worker that dies on a file
costing no study (`build_cache`).

    python -m kernel_utils.io.cache_build --data-dir DIR --work-dir WORK --split train --image-size 256 --shard 1/2
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kernel_utils.io.cache import CacheSpec, build_entry, cache_dir
from kernel_utils.io.npz_store import remove_orphan_temps

log = logging.getLogger(__name__)


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'k/n' (k from 1 to n) -> (k, n); None -> (1, 1)."""
    if not shard:
        return 1, 1
    try:
        k, n = (int(v) for v in shard.split("/"))
    except ValueError as e:
        raise ValueError(f"shard must look like 'k/n', e.g. '1/4', got {shard!r}") from e
    if not 1 <= k <= n:
        raise ValueError(f"shard {shard!r}: k must be between 1 and n")
    return k, n


def _worker_init() -> None:
    """Large malloc thresholds (the per-slice temporaries otherwise page-fault, see ../shared/MEASURED.md), and a
    SIGTERM when the parent dies, so a killed run leaves no worker behind (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 1024 * 1024)  # M_TRIM_THRESHOLD
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def build_cache(data_dir: str | os.PathLike, work_dir: str | os.PathLike, split: str = "train",
                spec: CacheSpec | None = None, workers: int = 2, shard: str | None = None,
                uids: list[str] | None = None, progress: bool = True, verify: bool = True) -> pd.DataFrame:
    """Preprocess every study of `data_dir/<split>_images` (or `uids`) into the cache.

    With several workers, a native reader that crashes a worker process cannot end the run: the studies the
    broken pool did not finish are read again one process each with pydicom alone, and a study whose process
    still dies gets a failed row. `verify`: CRC-check existing entries before counting them as cached.

    Returns:
        One row per study: StudyInstanceUID, status (built, cached or failed), error, n_files, n_slices,
        duplicates_dropped, transfer_syntax, reversed, decoder, has_mask, seconds, path.
    """
    spec = spec or CacheSpec()
    images_dir = Path(data_dir) / f"{split}_images"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} not found: is DATA_DIR the competition folder?")
    all_uids = sorted(p.name for p in images_dir.iterdir() if p.is_dir())
    if uids is not None:
        all_uids = [u for u in all_uids if u in set(uids)]
    k, n = parse_shard(shard)
    todo = [u for i, u in enumerate(all_uids) if i % n == k - 1]
    folder = cache_dir(work_dir, spec)
    remove_orphan_temps(folder)
    seg_dir = Path(data_dir) / "segmentations"
    jobs = [(images_dir / u, spec, folder, seg_dir / f"{u}.nii", False, verify) for u in todo]
    bar = dict(total=len(jobs), desc=f"cache {split}", disable=not progress, unit="study")
    if workers > 1 and len(jobs) > 1:
        rows = _build_in_pool(jobs, workers, bar)
    else:
        rows = [_build_job(j) for j in tqdm(jobs, **bar)]
    return pd.DataFrame(rows)


def _build_job(job: tuple) -> dict:
    return build_entry(*job)


def _build_in_pool(jobs: list[tuple], workers: int, bar: dict) -> list[dict]:
    """Rows of `jobs` in order, built by `workers` forked processes; see `build_cache` for a crashed worker."""
    ctx = multiprocessing.get_context("fork")
    rows: list[dict | None] = [None] * len(jobs)
    with tqdm(**bar) as progress:
        try:
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                futures = {pool.submit(_build_job, job): i for i, job in enumerate(jobs)}
                for future in as_completed(futures):
                    rows[futures[future]] = future.result()
                    progress.update()
        except BrokenProcessPool:
            left = [i for i, r in enumerate(rows) if r is None]
            log.warning("a preprocessing worker died (a native reader crashed on a file); %d unfinished studies "
                        "are read again one process each, with pydicom alone", len(left))
            for i in left:
                rows[i] = _build_isolated(jobs[i], ctx)
                progress.update()
    return rows  # type: ignore[return-value]


def _build_isolated(job: tuple, ctx) -> dict:
    """One study in a process of its own with decoder="pydicom": a crash there fails this study alone."""
    study_dir, spec, folder, seg, force, verify = job
    try:
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=_worker_init) as pool:
            return pool.submit(build_entry, study_dir, spec, folder, seg, force, verify, "pydicom").result()
    except BrokenProcessPool:
        error = "the reading process crashed on this study, with dicomsdl and with pydicom"
        log.warning("%s: %s", study_dir.name, error)
        return {"StudyInstanceUID": study_dir.name, "path": str(folder / f"{study_dir.name}.npz"),
                "status": "failed", "error": error, "seconds": 0.0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the preprocessing cache of one split.")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--split", default="train", choices=["train", "test"])
    ap.add_argument("--image-size", type=int, default=256, help="0 keeps the native size")
    ap.add_argument("--crop", action="store_true", help="crop to the Otsu box before resizing")
    ap.add_argument("--compress", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard", default=None, help="k/n: process every n-th study starting at the k-th")
    ap.add_argument("--no-verify", action="store_true", help="count complete entries as cached without a CRC check")
    args = ap.parse_args(argv)
    spec = CacheSpec(image_size=args.image_size or None, crop=args.crop, compress=args.compress)
    summary = build_cache(args.data_dir, args.work_dir, args.split, spec, args.workers, args.shard,
                          verify=not args.no_verify)
    print(summary.status.value_counts().to_string())
    print(f"cache: {cache_dir(args.work_dir, spec)}")


if __name__ == "__main__":
    main()
