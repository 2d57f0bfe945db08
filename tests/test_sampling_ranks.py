"""Patch sampling per DDP rank: every rank has the same torch seed (seed_everything), DistributedSampler
gives each its own indices; the ranks must draw different patches, each balanced over sources."""
from collections import Counter

import numpy as np
import torch

from datamodules.cache import CachedCase
from datamodules.datasets import PatchDataset


def _case(tmp_path, source, i, value):
    d = tmp_path / f"{source}{i}"
    d.mkdir()
    np.save(d / "image.npy", np.full((20, 20, 8), value, np.float32) + np.arange(20, dtype=np.float32)[:, None, None])
    lab = np.zeros((20, 20, 8), np.uint8)
    lab[5:9, 5:9, 2:5] = 3
    np.save(d / "label.npy", lab)
    fg = np.argwhere(lab == 3)
    np.save(d / "fg.npy", np.concatenate([np.full((len(fg), 1), 3), fg], axis=1))
    return CachedCase(d, {"source": source, "case": f"{source}{i}", "annotated": [True] * 8})


def _rank_draws(ds, rank, world, n):
    torch.manual_seed(0)  # the same on every rank, as under DDP
    out = []
    for idx in range(rank, n * world, world):  # DistributedSampler(shuffle=False)
        item = ds[idx]
        out.append((item["source"], float(item["image"][0, 0, 0, 0]), float(item["image"].sum())))
    return out


def test_ranks_draw_different_patches_each_balanced_over_sources(tmp_path):
    cases = [_case(tmp_path, "big", i, 100.0 * i) for i in range(9)] + [_case(tmp_path, "small", 0, -50.0)]
    ds = PatchDataset(cases, {"big": 0, "small": 1}, (8, 8, 4), length=800, fg_fraction=0.5,
                      sampling="source_balanced")
    r0, r1 = _rank_draws(ds, 0, 2, 400), _rank_draws(ds, 1, 2, 400)
    assert r0 != r1 and sum(a == b for a, b in zip(r0, r1)) < 40  # not the same patch stream
    for draws in (r0, r1):
        share = Counter(s for s, _, _ in draws)["small"] / len(draws)
        assert 0.42 < share < 0.58  # 1 case of 10, yet half the patches: balanced by source on each rank
    uniform = PatchDataset(cases, {"big": 0, "small": 1}, (8, 8, 4), length=800, sampling="uniform")
    share = Counter(s for s, _, _ in _rank_draws(uniform, 1, 2, 400))["small"] / 400
    assert share < 0.2  # uniform over cases: about 1 in 10
