"""`make bench` (or `python -m benchmarks.run [--quick] [--out bench]`): every benchmark in one run.

Writes `<out>/results.json` and `<out>/results.md` with the keys the performance issue names:
`harmonize_s` (ours / MONAI / TorchIO) and `gzip_s`; `patches_per_s` and `slices_per_s` (ours / MONAI /
TorchIO, 0 and 2 workers) with loader peak memory; `metrics_s` (ours / DeepMind surface-distance / MONAI)
and our values' largest difference from DeepMind's; `sliding_window_s`; and the ratios
`harmonize_vs_gzip`, `harmonize_vs_monai`, `patches_vs_monai`, `patches_vs_torchio`,
`metrics_vs_surface_distance`, `metrics_max_abs_diff`; `loop_overhead_ms_per_step` with its `loop_breakdown_ms`
(benchmarks.bench_loop: a real training epoch with a network that costs nothing) and `gpu` (the GPU section:
network-alone and real-epoch patches/s, their ratio, GPU busy %, sliding window; null without CUDA). `--quick` uses a 120-slice case and one repeat
(a few minutes on 2 cores). Timings are of this machine in this run: compare ratios, not seconds.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from experiments.tracking import atomic_write_text, write_json
from rundir.cli import command_name, run_cli


def _metrics(quick: bool) -> dict:
    from benchmarks import bench_metrics

    res = bench_metrics.run((512, 512, 300), (0.7, 0.7, 1.25), 1 if quick else 3)
    out = {"scenarios": {}}
    for name, sc in res["scenarios"].items():
        r = sc["results"]
        out["scenarios"][name] = {lib: r[lib]["median_s"] for lib in ("ours", "deepmind", "monai")}
        out["scenarios"][name]["max_abs_diff_vs_deepmind"] = max(r["deepmind"]["max_abs_diff_vs_ours"].values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=command_name("python -m benchmarks.run"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller case, one repeat: a few minutes on 2 cores")
    ap.add_argument("--out", type=Path, default=Path("bench"), help="folder for results.json / results.md")
    ap.add_argument("--workdir", type=Path, default=Path(".cache/bench"), help="synthetic cases and caches")
    ap.add_argument("--only", nargs="*", default=["harmonize", "patches", "metrics", "sliding", "loop", "gpu"])
    args = ap.parse_args(argv)
    t0 = time.time()
    res: dict = {"quick": args.quick, "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                                                   "platform": platform.platform()}}
    ratios: dict = {}
    if "harmonize" in args.only:
        from benchmarks import bench_harmonize
        h = bench_harmonize.run(args.workdir, args.quick)
        res.update(harmonize=h, harmonize_s=h["harmonize_s"], gzip_s=h["gzip_s"])
        ratios.update({k: h["ratios"][k] for k in ("harmonize_vs_gzip", "harmonize_vs_monai")})
    if "patches" in args.only:
        from benchmarks import bench_patches
        p = bench_patches.run(args.workdir, args.quick)
        res.update(patches=p, patches_per_s=p.get("patches_per_s"), slices_per_s=p.get("slices_per_s"),
                   loader_peak_pss_mb=p.get("peak_pss_mb"))
        ratios.update({k: v for k, v in (p.get("ratios") or {}).items()})
    if "metrics" in args.only:
        m = _metrics(args.quick)
        res["metrics_s"] = m["scenarios"]
        worst = max(m["scenarios"].values(), key=lambda s: s["ours"] / s["deepmind"])
        ratios["metrics_vs_surface_distance"] = {k: v["ours"] / v["deepmind"] for k, v in m["scenarios"].items()}
        ratios["metrics_vs_surface_distance_worst"] = worst["ours"] / worst["deepmind"]
        ratios["metrics_max_abs_diff"] = max(v["max_abs_diff_vs_deepmind"] for v in m["scenarios"].values())
    if "sliding" in args.only:
        from benchmarks import bench_sliding
        s = bench_sliding.run(args.workdir, args.quick)
        res.update(sliding=s, sliding_window_s=s["sliding_window_s"])
    if "loop" in args.only:
        from benchmarks import bench_loop
        lo = bench_loop.run(args.workdir, args.quick)
        res.update(loop=lo, loop_overhead_ms_per_step=lo["loop_overhead_ms_per_step"], loop_breakdown_ms=lo["breakdown"])
    if "gpu" in args.only:
        from benchmarks import bench_loop
        res["gpu"] = bench_loop.run_gpu(args.workdir, args.quick)  # None (JSON null) without CUDA
        if res["gpu"]:
            ratios["gpu_loop_efficiency"] = res["gpu"]["gpu_loop_efficiency"]
    res["ratios"] = ratios
    res["wall_s"] = round(time.time() - t0, 1)
    write_json(args.out / "results.json", res)
    atomic_write_text(args.out / "results.md", to_markdown(res))
    print(to_markdown(res))
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'} ({res['wall_s']} s)")
    return 0


def _f(v, nd=2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_f(x, nd)}" for k, x in v.items())
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def to_markdown(res: dict) -> str:
    lines = [f"# Benchmarks ({'quick' if res['quick'] else 'full'}; {res['machine']['cpu_count']} CPUs)", "",
             "| measure | ours | MONAI | TorchIO / DeepMind | note |", "|---|---|---|---|---|"]
    if "harmonize_s" in res:
        h = res["harmonize_s"]
        lines.append(f"| harmonize one case (s) | {_f(h['ours'])} | {_f(h['monai'])} | {_f(h['torchio'])} | gzip alone {_f(res['gzip_s'])} s |")
    for key, label in (("patches_per_s", "96^3 patches/s"), ("slices_per_s", "2D slices/s")):
        pp = res.get(key) or {}
        for w in ("0", "2"):
            if pp:
                lines.append(f"| {label}, {w} workers | {_f(pp.get('ours', {}).get(w), 1)} | {_f(pp.get('monai', {}).get(w), 1)} "
                             f"| {_f(pp.get('torchio', {}).get(w), 1)} | |")
    for name, sc in (res.get("metrics_s") or {}).items():
        lines.append(f"| Dice + NSD 1/3 mm + HD95, {name} (s) | {_f(sc['ours'])} | {_f(sc['monai'])} | {_f(sc['deepmind'])} "
                     f"| max abs diff vs DeepMind {sc['max_abs_diff_vs_deepmind']:.1e} |")
    if "sliding_window_s" in res:
        s = res["sliding"]
        lines.append(f"| sliding window, default 3D UNet (s) | {_f(res['sliding_window_s'])} | | | volume {s['volume']}, {s['device']} |")
    if "loop" in res:
        lo = res["loop"]
        lines += ["", f"Training loop, {lo['device']}, batch {lo['batch_size']} x {lo['patch_size']}, {lo['num_workers']} workers, "
                  f"{lo['steps']} steady steps (ms per step): step {_f(lo['step_ms'], 1)}, network + loss compute "
                  f"{_f(lo['compute_ms'], 1)}, **`loop_overhead_ms_per_step` {_f(lo['loop_overhead_ms_per_step'], 1)}**; "
                  f"an epoch's first step {_f(lo['epoch_start_ms'], 1)}; of step_other, releasing the step's logits "
                  f"(CPU allocator, measured alone) {_f(lo.get('logits_free_ms'), 1)}", "",
                  "| " + " | ".join(lo["breakdown"]) + " |", "|" + "---|" * len(lo["breakdown"]),
                  "| " + " | ".join(_f(v, 1) for v in lo["breakdown"].values()) + " |"]
    if "gpu" in res:
        g = res["gpu"]
        if g is None:
            lines += ["", "GPU section: no CUDA device here (`gpu`: null)."]
        else:
            lines += ["", f"GPU ({g['device']}), batch {g['batch_size']} x {g['patch_size']}:", "",
                      "| network alone, patches/s | fp32 | bf16 |", "|---|---|---|"]
            lines += [f"| {k} | {_f(v['fp32'], 1)} | {_f(v['bf16'], 1)} |" for k, v in g["gpu_step_patches_per_s"].items()]
            busy = (g["gpu_busy_percent"] or {}).get("median")
            lines += ["", f"real epoch ({g['network']}, {g['precision']}, {g['num_workers']} workers): "
                      f"{_f(g['gpu_loop_patches_per_s'], 1)} patches/s, efficiency {_f(g['gpu_loop_efficiency'])}, "
                      f"GPU busy {_f(busy, 0)} %; sliding window {_f(g['gpu_sliding_window_s'])} s per volume "
                      f"{g['sliding_volume']}"]
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| `{k}` | {_f(v)} |" for k, v in res["ratios"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m benchmarks.run"))
