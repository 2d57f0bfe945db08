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


def test_batched_fetch_equals_collated_samples(tmp_path):
    """`__getitems__` crops straight into the batch tensor; it must give exactly the samples (and the
    RNG stream) of per-sample fetching + default_collate, padding included (a 20x20x8 volume, 8x8x12
    patches: 2 slices of padding at each end in z)."""
    from torch.utils.data import default_collate

    from datamodules.datasets import collate_patches

    cases = [_case(tmp_path, "big", i, 100.0 * i) for i in range(3)] + [_case(tmp_path, "small", 0, -50.0)]
    ds = PatchDataset(cases, {"big": 0, "small": 1}, (8, 8, 12), length=64, fg_fraction=0.5, pad_value=-7.0)
    torch.manual_seed(3)
    single = default_collate([ds[i] for i in (5, 6, 7, 8)])
    torch.manual_seed(3)
    batched = collate_patches(ds.__getitems__([5, 6, 7, 8]))
    assert set(single) == set(batched)
    for key in ("image", "label", "annotated", "source_id"):
        assert single[key].dtype == batched[key].dtype and single[key].shape == batched[key].shape, key
        assert torch.equal(single[key], batched[key]), key
    for key in ("source", "case", "meta_path"):
        assert single[key] == batched[key]
    assert batched["image"].shape == (4, 1, 8, 8, 12) and batched["label"].dtype == torch.uint8
    # 8 stored slices centred in 12: 2 slices of padding on each side
    z = batched["image"][:, 0]
    assert (z[..., :2] == -7.0).all() and (z[..., 10:] == -7.0).all() and (z[..., 2:10] != -7.0).all()
    # through a DataLoader with a worker: the same keys, shapes and dtypes arrive in the training process
    from datamodules.datasets import patch_loader

    batch = next(iter(patch_loader(ds, 4, num_workers=1)))
    assert batch["image"].shape == (4, 1, 8, 8, 12) and batch["source_id"].dtype == torch.int64
    assert len(batch["case"]) == 4


def test_worker_buffers_hold_each_batch_while_it_is_in_use(tmp_path):
    """Loader workers cycle through a few shared-memory batches. A batch must stay intact for the step
    that uses it and Lightning's one-batch look-ahead: every case's volume is a constant (its number),
    so a batch whose buffer was rewritten too early would disagree with its own `case` list."""
    from datamodules.datasets import patch_loader

    cases = []
    for i in range(5):
        d = tmp_path / f"c{i}"
        d.mkdir()
        np.save(d / "image.npy", np.full((12, 12, 6), float(i), np.float32))
        np.save(d / "label.npy", np.full((12, 12, 6), i, np.uint8))
        np.save(d / "fg.npy", np.zeros((0, 4), np.int64))
        cases.append(CachedCase(d, {"source": "s", "case": f"c{i}", "annotated": [True] * 8}))
    ds = PatchDataset(cases, {"s": 0}, (8, 8, 4), length=240)

    def consistent(batch):
        want = torch.tensor([float(c[1:]) for c in batch["case"]])
        return bool((batch["image"].flatten(1) == want[:, None]).all()
                    and (batch["label"].flatten(1).float() == want[:, None]).all())

    for workers in (1, 2):
        torch.manual_seed(0)
        held = []
        for batch in patch_loader(ds, 3, num_workers=workers):
            held.append(batch)
            assert all(consistent(b) for b in held), f"{workers} worker(s): a held batch was overwritten"
            held = held[-2:]  # the step in progress and Lightning's look-ahead; a third is checked above
    assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"  # only workers switched
