"""Benchmark: scoring one full-size CT mask pair with ``evaluation.metrics`` vs DeepMind's package and MONAI.

Usage::

    python -m benchmarks.bench_metrics [--shape 512 512 300] [--spacing 0.7 0.7 1.25] [--repeats 3]
                                       [--out benchmarks/results/metrics.json]

What is measured, and why
    The claim under test (the issue): "A full-size 512x512x300 mask pair is scored (Dice, NSD at two
    tolerances, HD95) in a time measured by the benchmark". ``evaluation.metrics`` computes the surface
    distances of a pair once (DeepMind's surfel formulation) and derives every surface statistic from them,
    so a second NSD tolerance, HD95 and ASD cost next to nothing. A user without it would call DeepMind's
    ``surface_distance`` package or MONAI's metric functions; this script scores the SAME masks with all of
    them in the SAME run and reports wall time, peak memory and the values, so both speed and agreement
    are visible.

    Rows (one per library and scenario)
      ours             ``score_pair(pred, ref, spacing, 1.0, tolerances_mm=(1.0, 3.0))``: the one call the
                       evaluation makes per case and class (masks cropped to the union's bounding box,
                       surface distances once, NSD at 1 and 3 mm, HD95, ASD, Dice/IoU/RV on the crop).
                       Ratios are relative to this row.
      ours_functions   the separate functions: ``surface_distances`` once, then ``nsd`` at 1 and 3 mm,
                       ``hausdorff(sd, 95)``, ``asd``, and ``dice``, ``iou``, ``relative_volume`` (each of
                       these three a pass over the full arrays).
      deepmind         ``compute_surface_distances`` + ``compute_surface_dice_at_tolerance`` at 1 and 3 mm +
                       ``compute_robust_hausdorff(d, 95)`` + ``compute_average_surface_distance`` +
                       ``compute_dice_coefficient``. The package returns two directed mean distances; the
                       symmetric ASD shown is their surfel-area-weighted mean, which is our definition.
      monai            ``compute_surface_dice`` at 1 and 3 mm (``use_subvoxels=True`` when the installed
                       version has it: DeepMind's surfels and areas), ``compute_hausdorff_distance(percentile=95)``,
                       ``compute_average_surface_distance(symmetric=True)``, ``compute_dice``, all with
                       ``spacing`` and ``include_background=False`` on one-hot bool tensors (1, 2, X, Y, Z).
                       The time includes building those tensors from the numpy masks. Each call finds the
                       edges and distances anew (four times per pair). By design MONAI's HD95 and ASD use
                       boundary VOXELS (mask XOR its erosion), unweighted, with an interpolated quantile,
                       rather than area-weighted surfels on the corner grid, so they differ slightly from
                       the other two; its NSD with subvoxels should match.

    Scenarios (each built from ``np.random.default_rng(0)``; masks are bool, C order, in ``--shape``)
      compact    two overlapping ellipsoids of ~50k voxels each (the prediction shifted and rescaled).
      scattered  12 irregular lesion blobs spread over a lung-sized region (most of the volume), the
                 prediction being each blob shifted by up to 2 voxels per axis and dilated, eroded or
                 kept: COVID-19 multi-focal lesions, where the union bounding box (hence the distance
                 transform) is large even though the lesions are small.

    Method
      Each (scenario, library) runs in its own freshly spawned process: imports and a warm-up call on a tiny
      pair (lazy imports, lookup tables) are done first and not timed; then the masks are loaded and the
      library is timed ``--repeats`` times with ``time.perf_counter``; the median is reported. A library
      whose first timed run exceeds ``SLOW_S`` seconds is run once only (``runs`` says how often it ran).
      Peak memory: the process's peak RSS (VmHWM) is reset after loading the masks (``/proc/self/clear_refs``)
      and the increase of the peak over the RSS at that point is reported; where the reset is not possible
      the monotonic high-water mark is used and the figure is a lower bound (``rss_method`` says which).
      The processes run one after the other, so they do not compete for the cores.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import scipy
from scipy import ndimage

DEFAULT_OUT = Path("benchmarks/results/metrics.json")
TOLERANCES_MM = (1.0, 3.0)
PERCENTILE = 95.0
SLOW_S = 30.0  # a library whose first timed run takes longer than this is not repeated
N_SCATTERED = 12
LIBRARIES = ("ours", "ours_functions", "deepmind", "monai")
VALUE_KEYS = ("dice", "iou", "rv", "nsd_1mm", "nsd_3mm", "hd95", "asd")

# ------------------------------------------------------------------------------------------------ scenarios


def _blob(semi_axes: np.ndarray, rng: np.random.Generator, roughness: float) -> np.ndarray:
    """A bool ellipsoid (semi-axes in voxels) in a box of odd size centred on it, with a smooth random
    boundary when roughness > 0; the box leaves a margin of >= 4 voxels for shifts and dilation."""
    half = np.ceil(1.6 * semi_axes).astype(int) + 4
    box = tuple(int(2 * h + 1) for h in half)
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    rho = np.sqrt(sum((g / a) ** 2 for g, a in zip(grids, semi_axes)))
    if roughness > 0:
        noise = ndimage.gaussian_filter(rng.standard_normal(box), sigma=tuple(semi_axes / 3))
        noise = np.clip(noise / noise.std(), -2.0, 2.0)
        rho = rho + roughness * noise  # rho < 1 + 2 * roughness <= 1.6 stays inside the box
    return rho < 1.0


def _paste(volume: np.ndarray, local: np.ndarray, centre: np.ndarray) -> None:
    """OR `local` into `volume` with its centre voxel at `centre`, clipped to the volume."""
    dst, src = [], []
    for c, n, size in zip(centre, local.shape, volume.shape):
        start = int(c) - n // 2
        lo, hi = max(start, 0), min(start + n, size)
        dst.append(slice(lo, hi))
        src.append(slice(lo - start, hi - start))
    volume[tuple(dst)] |= local[tuple(src)]


def make_compact(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    centre = (np.array(shape) * [0.45, 0.40, 0.50]).astype(int)
    axes_ref = np.array([31.0, 26.0, 15.0])  # voxels: 4/3*pi*31*26*15 ~ 50.6k
    axes_pred = axes_ref * rng.uniform(0.93, 1.07, 3)
    shift = rng.integers(-3, 4, 3)
    _paste(ref, _blob(axes_ref, rng, 0.0), centre)
    _paste(pred, _blob(axes_pred, rng, 0.0), centre + shift)
    desc = (f"two overlapping ellipsoids, semi-axes {axes_ref.round(1).tolist()} (ref) and "
            f"{axes_pred.round(1).tolist()} (pred) voxels, centres {shift.tolist()} voxels apart")
    return pred, ref, desc


def make_scattered(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    lo, hi = np.array(shape) * [0.20, 0.15, 0.10], np.array(shape) * [0.80, 0.85, 0.90]  # lung-sized region
    ops = []
    for _ in range(N_SCATTERED):
        centre = rng.uniform(lo, hi).astype(int)
        axes = rng.uniform([8.0, 8.0, 4.0], [26.0, 26.0, 14.0])
        local = _blob(axes, rng, 0.3)
        moved = np.roll(local, tuple(int(v) for v in rng.integers(-2, 3, 3)), axis=(0, 1, 2))  # margin: no wrap
        op = str(rng.choice(["dilate", "erode", "keep"]))
        if op == "dilate":
            moved = ndimage.binary_dilation(moved)
        elif op == "erode":
            moved = ndimage.binary_erosion(moved)
        ops.append(op)
        _paste(ref, local, centre)
        _paste(pred, moved, centre)
    desc = (f"{N_SCATTERED} irregular blobs (semi-axes 8-26 x 8-26 x 4-14 voxels) in the region "
            f"{np.floor(lo).astype(int).tolist()}-{np.ceil(hi).astype(int).tolist()}; pred = each blob shifted "
            f"by <= 2 voxels per axis, then {ops.count('dilate')} dilated, {ops.count('erode')} eroded, "
            f"{ops.count('keep')} kept (1 iteration)")
    return pred, ref, desc


SCENARIOS: dict[str, Callable[[tuple[int, ...], np.random.Generator], tuple[np.ndarray, np.ndarray, str]]] = {
    "compact": make_compact,
    "scattered": make_scattered,
}


def _bbox_shape(m: np.ndarray) -> list[int]:
    out = []
    for axis in range(m.ndim):
        idx = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != axis)))
        out.append(int(idx[-1] - idx[0] + 1) if idx.size else 0)
    return out


# -------------------------------------------------------------------------------------------------- runners


def _run_ours(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    from evaluation import metrics as M

    s = M.score_pair(p, r, spacing, tolerance_mm=TOLERANCES_MM[0], percentile=PERCENTILE,
                     tolerances_mm=TOLERANCES_MM)
    out = {"dice": s["dice"], "iou": s["iou"], "rv": s["rv"], "hd95": s[f"hd{PERCENTILE:g}"], "asd": s["asd"]}
    out.update({f"nsd_{t:g}mm": s[f"nsd_{t:g}mm"] for t in TOLERANCES_MM})
    return out


def _run_ours_functions(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    from evaluation import metrics as M

    sd = M.surface_distances(p, r, spacing)
    out = {"dice": M.dice(p, r), "iou": M.iou(p, r), "rv": M.relative_volume(p, r)}
    out.update({f"nsd_{t:g}mm": M.nsd(sd, t) for t in TOLERANCES_MM})
    out.update(hd95=M.hausdorff(sd, PERCENTILE), asd=M.asd(sd))
    out.update(surfels_ref=sd.areas_ref.size, surfels_pred=sd.areas_pred.size)
    return out


def _run_deepmind(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    import surface_distance as dm

    d = dm.compute_surface_distances(r, p, spacing)  # (gt, pred) argument order
    out = {"dice": float(dm.compute_dice_coefficient(r, p))}
    out.update({f"nsd_{t:g}mm": float(dm.compute_surface_dice_at_tolerance(d, t)) for t in TOLERANCES_MM})
    out["hd95"] = float(dm.compute_robust_hausdorff(d, PERCENTILE))
    asd_gt_to_pred, asd_pred_to_gt = dm.compute_average_surface_distance(d)
    area_gt, area_pred = d["surfel_areas_gt"].sum(), d["surfel_areas_pred"].sum()
    out["asd"] = float((asd_gt_to_pred * area_gt + asd_pred_to_gt * area_pred) / (area_gt + area_pred))
    out.update(asd_ref_to_pred=float(asd_gt_to_pred), asd_pred_to_ref=float(asd_pred_to_gt))
    return out


def monai_uses_subvoxels() -> bool:
    from monai.metrics import compute_surface_dice

    return "use_subvoxels" in inspect.signature(compute_surface_dice).parameters


def _run_monai(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    def one_hot(m: np.ndarray) -> torch.Tensor:  # (1, 2, X, Y, Z): background, foreground
        t = torch.from_numpy(m)
        return torch.stack([~t, t])[None]

    yp, y = one_hot(p), one_hot(r)
    sub = {"use_subvoxels": True} if monai_uses_subvoxels() else {}
    out = {"dice": compute_dice(yp, y, include_background=False).item()}
    for t in TOLERANCES_MM:
        out[f"nsd_{t:g}mm"] = compute_surface_dice(yp, y, [t], include_background=False, spacing=spacing,
                                                   **sub).item()
    out["hd95"] = compute_hausdorff_distance(yp, y, include_background=False, percentile=PERCENTILE,
                                             spacing=spacing).item()
    out["asd"] = compute_average_surface_distance(yp, y, include_background=False, symmetric=True,
                                                  spacing=spacing).item()
    return out


RUNNERS: dict[str, Callable[[np.ndarray, np.ndarray, tuple[float, ...]], dict[str, float]]] = {
    "ours": _run_ours,
    "ours_functions": _run_ours_functions,
    "deepmind": _run_deepmind,
    "monai": _run_monai,
}

# --------------------------------------------------------------------------------------- worker (subprocess)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_kb() -> int:
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _start_rss() -> tuple[int, str]:
    """(baseline kB, method). Resets the peak-RSS mark to the current RSS where the kernel allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
        rss = _status_kb("VmRSS")
        if rss is not None:
            return rss, "VmHWM reset after loading; peak minus RSS at that point"
    except OSError:
        pass
    return _peak_kb(), "monotonic peak RSS (lower bound: increase over the earlier peak)"


def _worker(library: str, pred_path: str, ref_path: str, spacing: tuple[float, ...], repeats: int,
            slow_s: float) -> dict:
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # scipy.ndimage.filters in surface_distance
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's own internal deprecation notice
    run = RUNNERS[library]
    tiny = np.zeros((12, 12, 12), bool)
    tiny_r, tiny_p = tiny.copy(), tiny.copy()
    tiny_r[3:8, 3:8, 3:8], tiny_p[4:9, 3:8, 3:9] = True, True
    run(tiny_p, tiny_r, spacing)  # warm-up: lazy imports, lookup tables (untimed)
    pred, ref = np.load(pred_path), np.load(ref_path)
    baseline_kb, rss_method = _start_rss()
    times: list[float] = []
    values: dict[str, float] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        values = run(pred, ref, spacing)
        times.append(time.perf_counter() - t0)
        if times[0] > slow_s:
            break
    peak_kb = _peak_kb()
    out = {"times_s": times, "median_s": statistics.median(times), "runs": len(times),
           "peak_rss_increase_mb": max(peak_kb - baseline_kb, 0) / 1024, "rss_method": rss_method,
           "values": {k: float(v) for k, v in values.items()}}
    if library == "monai":
        import torch

        out["torch_threads"] = torch.get_num_threads()
        out["use_subvoxels"] = monai_uses_subvoxels()
    return out


def _in_fresh_process(*args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_worker, *args).result()


# -------------------------------------------------------------------------------------------------- report


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "monai": _version("monai"), "torch": _version("torch"), "surface_distance": _version("surface-distance"),
            "cpu_count": os.cpu_count(), "cpus_usable": usable, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


def _fmt(v: float | None, nd: int = 4) -> str:
    if v is None:
        return "-"
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.{nd}f}"


def print_table(name: str, sc: dict) -> None:
    print(f"\n== {name}: {sc['description']}")
    print(f"   ref {sc['ref_voxels']} voxels ({sc['ref_components']} components), pred {sc['pred_voxels']} voxels "
          f"({sc['pred_components']} components), union bbox {sc['union_bbox']} voxels")
    head = f"{'library':<16}{'median s':>9}{'x ours':>8}{'runs':>5}{'dRSS MB':>9}" + "".join(
        f"{k:>9}" for k in VALUE_KEYS)
    print(head)
    print("-" * len(head))
    for lib, res in sc["results"].items():
        vals = res["values"]
        print(f"{lib:<16}{res['median_s']:>9.3f}{res['ratio_to_ours']:>8.2f}{res['runs']:>5}"
              f"{res['peak_rss_increase_mb']:>9.0f}" + "".join(f"{_fmt(vals.get(k)):>9}" for k in VALUE_KEYS))
    for lib, res in sc["results"].items():
        diffs = res.get("max_abs_diff_vs_ours")
        if lib != "ours" and diffs:
            print(f"   |{lib} - ours|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 1.25], metavar=("SX", "SY", "SZ"),
                    help="voxel size in mm per array axis")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per library (median reported)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (written atomically)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or min(args.shape) < 32 or min(args.spacing) <= 0:
        ap.error("need --repeats >= 1, every --shape value >= 32 and positive --spacing")
    return args


def run(shape: tuple[int, ...], spacing: tuple[float, ...], repeats: int) -> dict:
    """Every scenario x library, each in a fresh process; the result dict main() writes."""
    t_start = time.perf_counter()
    env = environment()
    subvox = monai_uses_subvoxels()
    print("bench_metrics: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"shape {list(shape)}, spacing {list(spacing)} mm, repeats {repeats} (median; a library whose first "
          f"run exceeds {SLOW_S:g} s runs once), NSD tolerances {list(TOLERANCES_MM)} mm, HD{PERCENTILE:g}")
    print(f"MONAI compute_surface_dice: use_subvoxels={'True (DeepMind surfels)' if subvox else 'not available'}; "
          "MONAI HD95/ASD use boundary voxels, unweighted (not surfel areas): small differences are by design")
    result = {"benchmark": "evaluation.metrics vs surface_distance vs monai on one full-size mask pair",
              "environment": env,
              "settings": {"shape": list(shape), "spacing_mm": list(spacing), "repeats": repeats,
                           "slow_s": SLOW_S, "tolerances_mm": list(TOLERANCES_MM), "percentile": PERCENTILE,
                           "monai_use_subvoxels": subvox},
              "notes": {"ours": "score_pair with tolerances_mm=(1, 3): the evaluation's one call per case and class",
                        "ours_functions": "surface_distances once; nsd at both tolerances, hausdorff 95, asd; "
                                          "dice, iou, relative_volume on the full arrays",
                        "deepmind": "asd = surfel-area-weighted mean of the package's two directed means",
                        "monai": "one-hot bool tensors (1,2,X,Y,Z) built inside the timing; HD95/ASD on boundary "
                                 "voxels without area weights and with an interpolated quantile, so they differ "
                                 "from the surfel values by design"},
              "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="bench_metrics_") as tmp:
        for name, make in SCENARIOS.items():
            pred, ref, desc = make(shape, np.random.default_rng(0))
            pred_path, ref_path = os.path.join(tmp, f"{name}_pred.npy"), os.path.join(tmp, f"{name}_ref.npy")
            np.save(pred_path, pred)
            np.save(ref_path, ref)
            sc = {"description": desc, "ref_voxels": int(ref.sum()), "pred_voxels": int(pred.sum()),
                  "ref_components": int(ndimage.label(ref)[1]), "pred_components": int(ndimage.label(pred)[1]),
                  "union_bbox": _bbox_shape(pred | ref), "results": {}}
            del pred, ref
            for lib in LIBRARIES:
                res = _in_fresh_process(lib, pred_path, ref_path, spacing, repeats, SLOW_S)
                sc["results"][lib] = res
                print(f"  {name:<10} {lib:<16} median {res['median_s']:.3f} s over {res['runs']} run(s)", flush=True)
            ours = sc["results"]["ours"]
            for res in sc["results"].values():
                res["ratio_to_ours"] = res["median_s"] / ours["median_s"]
                res["max_abs_diff_vs_ours"] = {k: abs(res["values"][k] - ours["values"][k]) for k in VALUE_KEYS
                                               if k in res["values"] and k in ours["values"]}
            result["scenarios"][name] = sc
            print_table(name, sc)
    result["total_wall_s"] = time.perf_counter() - t_start
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(tuple(args.shape), tuple(args.spacing), args.repeats)
    write_json_atomic(args.out, result)
    print(f"\ntotal wall time {result['total_wall_s']:.1f} s; results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
