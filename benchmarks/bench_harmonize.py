"""Benchmark: one full-size `.nii.gz` CT case (image + mask) from disk to harmonized arrays.

    python -m benchmarks.bench_harmonize [--quick] [--workdir DIR] [--out FILE.json]

Rows, timed on the SAME files (benchmarks/synthetic.py: 512x512x300 int16 at 0.7x0.7x1.0 mm, LPS):
- `gzip_s`: bare gzip decompression of both files (the floor any NIfTI reader pays);
- `ours`: datamodules.harmonize.harmonize_case (read, RAS, resample to 1.5 mm, window -1000..300 -> [0, 1],
  mask decoded through a label policy);
- `monai`: LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(1.5 mm, bilinear / nearest)
  -> ScaleIntensityRanged(-1000..300 -> 0..1, clip), the chain of MONAI's tutorials;
- `torchio`: Subject(ScalarImage, LabelMap) -> ToCanonical -> Resample(1.5) -> Clamp(-1000, 300) ->
  RescaleIntensity((0, 1), in_min_max=(-1000, 300)).
Each row runs in a fresh process after an untimed warm-up on a small file (imports, lazy init); the
median of `repeats` runs (3; full 5) is reported.
"""
from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.synthetic import QUICK_SHAPE, SHAPE, write_case

TARGET_MM = (1.5, 1.5, 1.5)
WINDOW = (-1000.0, 300.0)


def _ours(image: Path, label: Path):
    from datamodules.cases import Case
    from datamodules.harmonize import HarmonizerConfig, harmonize_case
    from datamodules.label_policy import LabelPolicy

    policy = LabelPolicy("bench", {0: "background", 1: "lesion", 2: "lung_left"}, ("lesion", "lung_left"), "bench")
    case = Case("bench", "ct", "ct", image=image, label=label)
    out = harmonize_case(case, policy, HarmonizerConfig(TARGET_MM, WINDOW, "minmax", -500.0, 500.0))
    return out.image.shape


def _monai(image: Path, label: Path):
    from monai import transforms as T

    chain = T.Compose([T.LoadImaged(keys=["image", "label"]), T.EnsureChannelFirstd(keys=["image", "label"]),
                       T.Orientationd(keys=["image", "label"], axcodes="RAS"),
                       T.Spacingd(keys=["image", "label"], pixdim=TARGET_MM, mode=("bilinear", "nearest")),
                       T.ScaleIntensityRanged(keys=["image"], a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0,
                                              clip=True)])
    return tuple(chain({"image": str(image), "label": str(label)})["image"].shape)


def _torchio(image: Path, label: Path):
    import torchio as tio

    chain = tio.Compose([tio.ToCanonical(), tio.Resample(TARGET_MM), tio.Clamp(*WINDOW),
                         tio.RescaleIntensity(out_min_max=(0, 1), in_min_max=WINDOW)])
    subject = chain(tio.Subject(image=tio.ScalarImage(image), label=tio.LabelMap(label)))
    return tuple(subject["image"].data.shape)


def _gzip(image: Path, label: Path):
    return sum(len(gzip.decompress(p.read_bytes())) for p in (image, label))


ROWS = {"gzip": _gzip, "ours": _ours, "monai": _monai, "torchio": _torchio}


def _worker(row: str, image: str, label: str, warm: tuple[str, str], repeats: int, queue) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    fn = ROWS[row]
    try:
        fn(Path(warm[0]), Path(warm[1]))
        times, shape = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            shape = fn(Path(image), Path(label))
            times.append(time.perf_counter() - t)
        queue.put({"median_s": statistics.median(times), "runs": repeats, "output": str(shape)})
    except Exception as exc:  # a library failing is recorded, not fatal to the benchmark
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run(workdir: Path, quick: bool = False, repeats: int | None = None) -> dict:
    shape = QUICK_SHAPE if quick else SHAPE
    image, label = write_case(workdir / "synthetic" / ("quick" if quick else "full"), shape=shape)
    warm = write_case(workdir / "synthetic" / "warmup", shape=(64, 64, 32))
    # three runs in quick mode too: the first call in a process also pays first-touch page faults of its
    # large buffers, which a cache build pays once per worker, not per case (every library alike)
    repeats = repeats or (3 if quick else 5)
    ctx = mp.get_context("spawn")
    out = {"shape": list(shape), "spacing_mm": [0.7, 0.7, 1.0], "target_mm": list(TARGET_MM),
           "file_mb": round(sum(p.stat().st_size for p in (image, label)) / 2**20, 1), "rows": {}}
    for row in ROWS:
        q = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(row, str(image), str(label), tuple(map(str, warm)), repeats, q))
        proc.start()
        out["rows"][row] = q.get()
        proc.join()
        print(f"  harmonize {row:<8} {out['rows'][row]}", flush=True)
    r = {k: v.get("median_s") for k, v in out["rows"].items()}
    out["harmonize_s"] = {k: r[k] for k in ("ours", "monai", "torchio")}
    out["gzip_s"] = r["gzip"]
    out["ratios"] = {"harmonize_vs_gzip": r["ours"] / r["gzip"] if r["ours"] and r["gzip"] else None,
                     "harmonize_vs_monai": r["ours"] / r["monai"] if r["ours"] and r["monai"] else None,
                     "harmonize_vs_torchio": r["ours"] / r["torchio"] if r["ours"] and r["torchio"] else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_harmonize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run(args.workdir, args.quick)
    print(json.dumps(result, indent=1))
    if args.out:
        from experiments.tracking import write_json
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
