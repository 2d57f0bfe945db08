"""Contract of the zoo: every network x every dimensionality it supports x every DG method trains a few
steps on tiny phantom patches with a finite loss, ERM's loss goes down, and the prediction for a whole
held-out volume has exactly that volume's shape. Sizes come from the smoke preset (experiment=smoke), so
this also proves the preset selects every network as shipped."""
import pytest
import torch

from datamodules.datamodule import MultiSourceDataModule
from datamodules.harmonize import HarmonizerConfig
from datamodules.label_policy import CLASSES
from experiments.config import load_config, selected_args
from lightning_modules.methods import METHODS
from lightning_modules.networks import NETWORKS
from lightning_modules.segmentation import SegmentationModule
from tests.args import base_args

SOURCES3 = ["covid19_20", "mosmed", "ctseg"]
EVALUATION = {"space": "harmonized", "val_surface": False, "save_predictions": False,
              "classes": {"lesion": {"values": [3, 6, 7], "tolerance_mm": 3.0}}}
SPACING = (6.0, 6.0, 8.0)
NETS = [(n, d) for n in sorted(NETWORKS) for d in NETWORKS[n].dims]


@pytest.fixture(scope="module")
def data(phantom_root, tmp_path_factory):
    torch.manual_seed(0)
    dm = MultiSourceDataModule(phantom_root, tmp_path_factory.mktemp("h"), SOURCES3, holdout="mosmed",
                               harmonizer=HarmonizerConfig(target_spacing=SPACING), patch_size=(32, 32, 32),
                               batch_size=2, samples_per_epoch=2, fg_fraction=1.0)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    volume = next(iter(dm.test_dataloader()))
    # a corner of the held-out volume, no multiple of any patch: sliding windows must pad and crop back
    sl = (slice(None), slice(None), slice(0, 37), slice(0, 29), slice(0, 19))
    volume = dict(volume, image=volume["image"][sl], label=volume["label"][sl])
    assert volume["image"].shape[2:] == (37, 29, 19)
    return dm, batch, volume


def patch_for(divisor) -> tuple[int, ...]:
    """The smallest patch of at least 16 voxels per axis that the network's divisor allows (32 for SwinUNETR)."""
    return tuple(-(-16 // d) * d for d in divisor)


def make_module(name: str, dims: int, method: str, patch=None, **model) -> SegmentationModule:
    """The module with the smoke preset's arguments, on the smallest patch the network accepts."""
    if patch is None:
        patch = patch_for(_divisor(name, dims))
    cfg = load_config(["experiment=smoke"])
    net_args = selected_args(cfg, "networks", name)
    # batch norm wherever a network lets us choose: test-time methods adapt its statistics / affine parameters
    if "norm" in net_args:
        net_args["norm"] = "batch"
    method_args = selected_args(cfg, "methods", method)
    torch.manual_seed(0)
    return SegmentationModule(
        network={"name": name, **net_args, **model}, loss={"name": "dice_ce", **base_args("losses", "dice_ce")}, optim={"lr": 3e-3, "weight_decay": 0.0},
        inference={"roi_size": list(patch), "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian"},
        evaluation=EVALUATION, spatial_dims=dims, harmonizer={"target_spacing": list(SPACING)},
        method={"name": method, **method_args}, train_sources=["covid19_20", "ctseg"], test_sources=["mosmed"])


_DIVISORS: dict = {}


def _divisor(name: str, dims: int):
    if (name, dims) not in _DIVISORS:
        _DIVISORS[(name, dims)] = make_module(name, dims, "erm", patch=(32, 32, 32)).net.divisor
    return _DIVISORS[(name, dims)]


def crop(batch: dict, patch) -> dict:
    sl = (slice(None), slice(None), *[slice(0, p) for p in patch])
    return dict(batch, image=batch["image"][sl], label=batch["label"][sl])


def train_steps(module: SegmentationModule, batch: dict, steps: int) -> list[float]:
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    module.log = lambda *a, **k: None  # no trainer here
    module.train()
    losses = []
    for _ in range(steps):
        b = module.method.transform_batch(dict(batch), module)
        loss = module.training_loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def predict(module: SegmentationModule, volume: dict) -> torch.Tensor:
    module.eval()
    if module.method.test_time:
        with torch.enable_grad():
            module.method.adapt(module, [volume["image"]])
    with torch.no_grad():
        return module.predict_volume(volume["image"])


@pytest.mark.parametrize("name,dims", NETS, ids=[f"{n}-{d}d" for n, d in NETS])
def test_erm_learns_and_predicts_whole_volumes(data, name, dims):
    _dm, batch, volume = data
    module = make_module(name, dims, "erm")
    losses = train_steps(module, crop(batch, module.hparams.inference["roi_size"]), 8)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert min(losses[-3:]) < losses[0], f"{name} {dims}D: loss did not go down: {losses}"
    logits = predict(module, volume)
    assert logits.shape == (1, len(CLASSES), *volume["label"].shape[2:])


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"erm"}))
@pytest.mark.parametrize("name,dims", NETS, ids=[f"{n}-{d}d" for n, d in NETS])
def test_every_method_runs_with_every_network(data, name, dims, method):
    _dm, batch, volume = data
    module = make_module(name, dims, method)
    losses = train_steps(module, crop(batch, module.hparams.inference["roi_size"]), 2)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    logits = predict(module, volume)
    assert logits.shape == (1, len(CLASSES), *volume["label"].shape[2:])
    assert torch.isfinite(logits[:, :1]).all()


def test_25d_context_trains_on_complete_slices_and_predicts_whole_volumes(data):
    """2.5D: 2 neighbours per side as channels; the loss skips the 2 end slices of each patch, whose
    context would be invented, and the volume prediction covers every slice."""
    _dm, batch, volume = data
    module = make_module("unet", 2, "erm", context_slices=2)
    assert module.net.margin == 2
    b = crop(batch, module.hparams.inference["roi_size"])
    losses = train_steps(module, b, 8)
    assert min(losses[-3:]) < losses[0], losses
    # the loss ignores the margin: junk labels in the end slices change nothing
    junk = dict(b, label=b["label"].clone())
    junk["label"][..., :2] = 3
    junk["label"][..., -2:] = 0
    module.eval()
    with torch.no_grad():
        assert module.training_loss(junk).item() == pytest.approx(module.training_loss(b).item(), rel=1e-6)
    logits = predict(module, volume)
    assert logits.shape == (1, len(CLASSES), *volume["label"].shape[2:])
