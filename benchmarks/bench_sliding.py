"""Benchmark: sliding-window inference of one harmonized volume with the default 3D network.

The network, patch (roi) size, overlap, batch and blending are those of `experiments/configs/base.yaml`
(MONAI UNet 16..256 channels, roi 128x128x32, overlap 0.5, gaussian), the volume is the synthetic
full-size case harmonized to base.yaml's 1.5 x 1.5 x 5 mm (quick: the 120-slice case). Untrained
weights: speed does not depend on them. Median of `repeats` runs after a warm-up window.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference

from benchmarks.synthetic import QUICK_SHAPE, SHAPE, write_case


def run(workdir: Path, quick: bool = False, repeats: int | None = None, device: str = "cpu") -> dict:
    from datamodules.cases import Case
    from datamodules.harmonize import harmonize_case
    from datamodules.label_policy import CLASSES
    from experiments.config import load_config, selected_args
    from experiments.runner import harmonizer_config
    from lightning_modules.networks import build_network

    cfg = load_config([])
    shape = QUICK_SHAPE if quick else SHAPE
    image, _ = write_case(workdir / "synthetic" / ("quick" if quick else "full"), shape=shape)
    d = cfg.data
    harm = harmonize_case(Case("bench", "ct", "ct", image=image), None, harmonizer_config(cfg))
    m = cfg.model
    args = selected_args(cfg, "networks", m.name)
    net = build_network(m.name, m.spatial_dims, 1, len(CLASSES), patch_size=tuple(d.patch_size),
                        spacing=tuple(d.target_spacing), context_slices=m.context_slices, **args).to(device).eval()
    x = torch.from_numpy(harm.image)[None, None].to(device)
    inf, roi = cfg.inference, tuple(d.patch_size)

    def once():
        with torch.inference_mode():
            return sliding_window_inference(x, roi_size=roi, sw_batch_size=inf.sw_batch_size, predictor=net,
                                            overlap=inf.overlap, mode=inf.mode)

    with torch.inference_mode():
        net(torch.zeros((1, 1, *roi), device=device))  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats or (1 if quick else 2)):
        t = time.perf_counter()
        out = once()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"sliding_window_s": statistics.median(times), "runs": len(times), "volume": list(harm.image.shape),
            "roi": list(roi), "overlap": inf.overlap, "sw_batch_size": inf.sw_batch_size, "mode": inf.mode,
            "network": {"name": m.name, **args}, "output": list(out.shape), "device": device,
            "threads": torch.get_num_threads()}
