"""Patch augmentation after the crop: known label maps under flips, hand-computed intensities."""
import numpy as np
import pytest
import torch

from datamodules.augment import AUGMENTS, Augmenter
from datamodules.label_policy import CLASS_INDEX
from tests.args import base_args

LEFT, RIGHT, LESION = CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"], CLASS_INDEX["lesion"]


def _batch():
    """Two 6x4x2 patches: patient's left lung at high x (RAS: +x is the patient's left), right lung at
    low x, a lesion voxel at x=1 (in the right lung); image = x coordinate."""
    label = torch.zeros(2, 1, 6, 4, 2, dtype=torch.uint8)
    label[:, 0, :3] = RIGHT
    label[:, 0, 3:] = LEFT
    label[:, 0, 1, 0, 0] = LESION
    image = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1, 1).expand(2, 1, 6, 4, 2).clone()
    return image, label


def test_flip_rl_swaps_lung_sides_and_keeps_anatomy():
    image, label = _batch()
    out_img, out_lab = AUGMENTS["flip"](image, label, {"p": 1.0, "axes": [0]}, torch.Generator().manual_seed(0))
    # mirrored: x=0 now holds what was at x=5 ...
    assert out_img[0, 0, :, 0, 0].tolist() == [5, 4, 3, 2, 1, 0]
    # ... and the lung lying at low x after the mirror is the mirrored LEFT lung: it must be called right
    assert (out_lab[:, 0, :3] == RIGHT).all() and (out_lab[:, 0, 3:][out_lab[:, 0, 3:] != LESION] == LEFT).all()
    assert out_lab[0, 0, 4, 0, 0] == LESION and int((out_lab == LESION).sum()) == 2  # lesion moved 1 -> 4
    assert label[0, 0, 0, 0, 0] == RIGHT and label[0, 0, 1, 0, 0] == LESION and image[0, 0, 0, 0, 0] == 0  # inputs untouched


def test_flip_other_axes_keep_class_names():
    image, label = _batch()
    _, out = AUGMENTS["flip"](image, label, {"p": 1.0, "axes": [1, 2]}, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(out.flatten()), torch.bincount(label.flatten()))
    assert (out[:, 0, :3][out[:, 0, :3] != LESION] == RIGHT).all()
    assert out[0, 0, 1, 3, 1] == LESION  # (1, 0, 0) -> (1, 3, 1)


def test_flip_probability_per_sample():
    image = torch.arange(4, dtype=torch.float32).view(1, 1, 4, 1, 1).expand(400, 1, 4, 1, 1).clone()
    label = torch.zeros(400, 1, 4, 1, 1, dtype=torch.uint8)
    out, _ = AUGMENTS["flip"](image, label, {"p": 0.3, "axes": [0]}, torch.Generator().manual_seed(1))
    flipped = (out[:, 0, 0, 0, 0] == 3).float().mean().item()
    assert 0.22 < flipped < 0.38  # about 30 % of the samples, each one decided on its own


def test_intensity_hand_values():
    image = torch.full((3, 1, 2, 2, 2), 0.5)
    label = torch.zeros(3, 1, 2, 2, 2, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(7)
    out, lab = AUGMENTS["intensity"](image, label, {"scale": 0.2, "shift": 0.1}, gen)
    gen = torch.Generator().manual_seed(7)
    a = 1.0 + (torch.rand(3, generator=gen) * 2 - 1) * 0.2
    b = (torch.rand(3, generator=gen) * 2 - 1) * 0.1
    np.testing.assert_allclose(out[:, 0, 0, 0, 0].numpy(), (0.5 * a + b).numpy(), rtol=1e-6)
    assert ((out - out[:, :, :1, :1, :1]) == 0).all()  # one factor per sample, not per voxel
    assert lab is label


def test_noise_std_and_reproducible():
    image = torch.zeros(2, 1, 40, 40, 40)
    label = torch.zeros_like(image, dtype=torch.uint8)
    a, _ = AUGMENTS["noise"](image, label, {"std": 0.1}, torch.Generator().manual_seed(3))
    b, _ = AUGMENTS["noise"](image, label, {"std": 0.1}, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    stds = a.flatten(1).std(1)
    assert (stds > 0).all() and (stds < 0.1 * 1.02).all()


def test_unknown_op_and_bad_axis_are_errors():
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        Augmenter({"rotate": {}})
    image, label = _batch()
    with pytest.raises(ValueError, match="axis 3 does not exist"):
        Augmenter({"flip": {"axes": [3]}})(image, label)


def test_device_side_augmentation_only_while_training():
    """augment.where=device: SegmentationModule augments after the transfer, training batches only."""
    from types import SimpleNamespace

    from lightning_modules.segmentation import SegmentationModule

    module = SegmentationModule(
        network={"name": "unet", **base_args("networks", "unet", channels=[4, 8], strides=[2], num_res_units=0)},
        loss={"name": "dice_ce", **base_args("losses", "dice_ce")}, optim={"lr": 1e-3}, inference={"roi_size": [8, 8, 4]},
        evaluation={"classes": {}}, augment={"where": "device", "ops": {"flip": {"p": 1.0, "axes": [0]}}})
    image, label = _batch()
    module._trainer = SimpleNamespace(training=True)
    out = module.on_after_batch_transfer({"image": image, "label": label, "case": ["a", "b"]}, 0)
    assert out["image"][0, 0, :, 0, 0].tolist() == [5, 4, 3, 2, 1, 0] and out["case"] == ["a", "b"]
    module._trainer = SimpleNamespace(training=False)  # validation / test volumes: untouched
    out = module.on_after_batch_transfer({"image": image, "label": label}, 0)
    assert out["image"] is image
    loader_side = SegmentationModule(
        network={"name": "unet", **base_args("networks", "unet", channels=[4, 8], strides=[2], num_res_units=0)},
        loss={"name": "dice_ce", **base_args("losses", "dice_ce")}, optim={"lr": 1e-3}, inference={"roi_size": [8, 8, 4]},
        evaluation={"classes": {}}, augment={"where": "loader", "ops": {"flip": {"p": 1.0}}})
    loader_side._trainer = SimpleNamespace(training=True)
    assert loader_side.on_after_batch_transfer({"image": image, "label": label}, 0)["image"] is image


def test_loader_side_augmentation_in_patch_dataset(tmp_path):
    from datamodules.cache import CachedCase
    from datamodules.datasets import PatchDataset

    d = tmp_path / "c"
    d.mkdir()
    np.save(d / "image.npy", np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 8, 4), np.float32))
    lab = np.zeros((8, 8, 4), np.uint8)
    lab[:4] = RIGHT
    lab[4:] = LEFT
    np.save(d / "label.npy", lab)
    np.save(d / "fg.npy", np.zeros((0, 4), np.int64))
    case = CachedCase(d, {"source": "s", "case": "c", "annotated": [True] * 8})
    ds = PatchDataset([case], {"s": 0}, (8, 8, 4), length=8, augment=Augmenter({"flip": {"p": 1.0, "axes": [0]}}))
    torch.manual_seed(0)
    batch = ds.__getitems__([0, 1])
    assert batch["image"][0, 0, :, 0, 0].tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
    assert (batch["label"][:, 0, :4] == RIGHT).all() and (batch["label"][:, 0, 4:] == LEFT).all()
