"""The training loop's host-side savings change what is computed nowhere: TrainLog writes what per-step
`self.log` calls wrote (bit for bit, through a CSV logger), the patch batch's direct transfer gives Lightning's
transfer, fused AdamW is chosen where torch has it, and the patch loader keeps the workers' buffers mapped
from one epoch to the next."""
from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.train_logging import TrainLog


class _Toy(pl.LightningModule):
    """A linear regression whose steps log a per-step loss and an epoch-only term, natively or via TrainLog."""

    def __init__(self, via_train_log: bool):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 1)
        self.via = via_train_log
        self.train_log = TrainLog()
        self.log_calls = 0

    def log(self, *args, **kwargs):
        self.log_calls += 1
        return super().log(*args, **kwargs)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.lin(x), y)
        extra = self.lin(x).abs().mean()
        b = x.shape[0]
        if self.via:
            self.train_log.add("train/loss", loss, b, per_step=True)
            self.train_log.add("train/extra", extra, b)
        else:
            self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=b)
            self.log("train/extra", extra, on_step=False, on_epoch=True, batch_size=b)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.via:
            self.train_log.flush(self, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _EpochValues(pl.Callback):
    """What a callback (our RunProgress, EpochRecords) reads at the epoch's end."""

    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, module):
        m = trainer.callback_metrics
        self.seen.append({k: m[k].item() for k in ("train/loss_epoch", "train/extra") if k in m})


def _fit(tmp_path, via: bool, bar: bool = False):
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(10, 3, generator=g), torch.randn(10, 1, generator=g))
    loader = DataLoader(data, batch_size=4)  # batches of 4, 4 and 2: the epoch mean is weighted by batch size
    module, values = _Toy(via), _EpochValues()
    logger = pl.loggers.CSVLogger(tmp_path, name="csv", version="")
    trainer = pl.Trainer(max_epochs=3, log_every_n_steps=2, logger=logger, callbacks=[values],
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=bar,
                         accelerator="cpu", devices=1)
    trainer.fit(module, loader)
    with open(tmp_path / "csv" / "metrics.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, values.seen, module, trainer


def test_train_log_writes_what_per_step_self_log_wrote(tmp_path):
    native, native_seen, native_module, _ = _fit(tmp_path / "native", via=False)
    ours, ours_seen, module, _ = _fit(tmp_path / "ours", via=True)
    assert ours == native  # same columns, steps and values, as written (full float precision)
    assert ours_seen == native_seen and len(ours_seen) == 3
    # the values themselves: 3 epochs, step values at global steps 2, 4, 6, 8 (log_every_n_steps=2)
    steps = [r["step"] for r in ours if r["train/loss_step"]]
    assert steps == ["1", "3", "5", "7"]  # Lightning's CSV rows count from 0
    assert sum(1 for r in ours if r["train/loss_epoch"]) == 3
    # 9 steps: natively 18 self.log calls; ours 4 step values + 3 epochs x 2 epoch values
    assert native_module.log_calls == 18 and module.log_calls == 4 + 6


def test_train_log_epoch_mean_is_weighted_by_batch_size():
    log = TrainLog()
    for value, b in ((1.0, 4), (2.0, 4), (7.0, 2)):
        log.add("train/loss", torch.tensor(value), b, per_step=True)
    s = log.series["train/loss"]
    assert s.count == 10 and s.total.item() == pytest.approx(1.0 * 4 + 2.0 * 4 + 7.0 * 2)
    assert s.last.item() == 7.0 and s.last_batch == 2
    log.reset_epoch()
    assert s.count == 0 and s.total is None and s.last.item() == 7.0
    with pytest.raises(ValueError, match="one element"):
        log.add("train/loss", torch.ones(2), 2, per_step=True)
    with pytest.raises(ValueError, match="per step and epoch-only"):
        log.add("train/loss", torch.tensor(1.0), 2)
    assert log.series["train/loss"].count == 0  # refused values leave the series as it was


def test_epoch_end_is_the_last_batch_a_stop_or_max_steps():
    from types import SimpleNamespace

    from lightning_modules.train_logging import epoch_ends, step_logged

    t = SimpleNamespace(num_training_batches=5, should_stop=False, max_steps=-1, global_step=3,
                        log_every_n_steps=3, fast_dev_run=False)
    assert not epoch_ends(t, 3) and epoch_ends(t, 4) and step_logged(t)
    assert epoch_ends(SimpleNamespace(**{**vars(t), "should_stop": True}), 0)
    assert epoch_ends(SimpleNamespace(**{**vars(t), "max_steps": 3}), 0)
    assert not step_logged(SimpleNamespace(**{**vars(t), "global_step": 4}))
    assert not step_logged(SimpleNamespace(**{**vars(t), "log_every_n_steps": 0}))
    with pytest.raises(RuntimeError, match="length"):
        epoch_ends(SimpleNamespace(**{**vars(t), "num_training_batches": float("inf")}), 0)


def test_no_progress_bar_no_per_step_host_read(tmp_path):
    """Lightning converts progress-bar values to Python numbers (.item(): a device sync on a GPU) after every
    batch. Without a bar nothing is asked for the bar; with one, the bar shows the step and epoch loss."""
    _, _, _, trainer = _fit(tmp_path / "nobar", via=True, bar=False)
    assert trainer.progress_bar_metrics == {}
    _, _, _, trainer = _fit(tmp_path / "bar", via=True, bar=True)
    assert {"train/loss_step", "train/loss_epoch"} <= set(trainer.progress_bar_metrics)


# ------------------------------------------------------------------------------ transfer and optimizer
def test_patch_batch_transfer_is_lightnings_transfer():
    from lightning_fabric.utilities.apply_func import move_data_to_device

    from lightning_modules.segmentation import SegmentationModule, flat_batch

    batch = {"image": torch.randn(2, 1, 4, 4, 4), "label": torch.randint(0, 3, (2, 1, 4, 4, 4), dtype=torch.uint8),
             "annotated": torch.ones(2, 5, dtype=torch.bool), "source": ["ctseg", "medseg"], "case": ("a", "b")}
    assert flat_batch(batch)
    module = SegmentationModule.__new__(SegmentationModule)  # the hook uses no module state
    ours = SegmentationModule.transfer_batch_to_device(module, batch, torch.device("cpu"), 0)
    ref = move_data_to_device(batch, torch.device("cpu"))
    assert list(ours) == list(ref)
    for k in batch:
        if isinstance(ref[k], torch.Tensor):
            assert ours[k].device == ref[k].device and ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k])
        else:
            assert list(ours[k]) == list(ref[k])
    # anything nested or non-string goes Lightning's way
    assert not flat_batch({"image": torch.ones(1), "meta": {"spacing": torch.ones(3)}})
    assert not flat_batch({"image": torch.ones(1), "index": [1, 2]})
    assert not flat_batch([torch.ones(1)])


def test_fused_adamw_where_torch_has_it():
    from lightning_modules.segmentation import fused_available

    assert fused_available([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3, dtype=torch.float64))])
    assert not fused_available([])
    assert not fused_available([torch.ones(2, dtype=torch.int64)])
    assert not fused_available([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, device="meta"))])


@pytest.mark.parametrize("setting, expected", [(None, True), (False, False), (True, True)])
def test_optim_fused_setting_reaches_adamw(setting, expected):
    from tests.test_loop import _module

    module = _module()
    module.hparams.optim["fused"] = setting
    module.hparams.optim["cosine"] = False
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and bool(opt.defaults["fused"]) is expected


def test_fused_adamw_update_is_torchs_default_within_rounding():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(50)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opts = [torch.optim.AdamW(a, lr=1e-2, weight_decay=1e-5), torch.optim.AdamW(b, lr=1e-2, weight_decay=1e-5, fused=True)]
    for _ in range(10):
        grads = [torch.randn(50) for _ in a]
        for params, opt in zip((a, b), opts):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ loader buffers across epochs
def test_patch_loader_keeps_worker_buffers_mapped_across_epochs(phantom_root, tmp_path, monkeypatch):
    """Every batch of a second epoch is found in torch's storage cache (no shared-memory file mapped again)."""
    import os

    import torch.multiprocessing.reductions as reductions

    from experiments.build import build_datamodule, resolve_data_root
    from experiments.config import load_config

    cfg = load_config([f"paths.data_root={phantom_root}", f"paths.cache={tmp_path / 'cache'}", "data.holdout=mosmed",
                       "data.batch_size=2", "data.patch_size=[32,32,16]", "data.num_workers=1",
                       "data.target_spacing=[6.0,6.0,8.0]", "data.find_duplicates=false", "data.samples_per_epoch=24"])
    root, _ = resolve_data_root(cfg)
    dm = build_datamodule(cfg, root, holdout="mosmed")
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    main, looked = os.getpid(), []
    lookup = reductions.storage_from_cache

    def counted(cls, handle):
        found = lookup(cls, handle)
        if os.getpid() == main:
            looked.append(found is not None)
        return found

    monkeypatch.setattr(reductions, "storage_from_cache", counted)
    try:
        first = sum(1 for _ in loader)
        misses_first = looked.count(False)
        looked.clear()
        second = sum(1 for _ in loader)
    finally:
        it = getattr(loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
    assert first == second == 12
    assert misses_first > 0  # the first epoch maps each buffer once
    assert looked and not any(found is False for found in looked), looked


# ------------------------------------------------------------------------------ the label check off the step
def _bad_label_batch(kind: str):
    from datamodules.label_policy import CLASS_INDEX, CLASSES

    annotated = torch.zeros(2, len(CLASSES), dtype=torch.bool)
    annotated[:, [0, CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"]]] = True  # a lung-only source
    target = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    target[0, 1, 1, 1] = CLASS_INDEX["lung_left"]
    if kind == "code":
        target[1, 2, 2, 2] = 200  # no class, not IGNORE
    elif kind == "class":
        target[1, 2, 2, 2] = CLASS_INDEX["lesion"]  # a class this source does not annotate
    logits = torch.randn(2, len(CLASSES), 4, 4, 3, generator=torch.Generator().manual_seed(0))
    return logits, target, annotated


@pytest.mark.parametrize("kind, message", [("code", "no class and not IGNORE"),
                                           ("class", "does not annotate")])
def test_deferred_label_check_raises_at_the_check_not_in_the_step(monkeypatch, kind, message):
    """On the device path (forced here: host_decides False) the training loss keeps its label check's result
    and raises at the module's check (before validation and checkpoints); standalone it raises at once."""
    from lightning_modules import losses
    from lightning_modules.losses import BadTrainingLabel, PartialDiceCELoss
    from tests.args import base_args

    monkeypatch.setattr(losses, "host_decides", lambda t: False)
    logits, target, annotated = _bad_label_batch(kind)
    standalone = PartialDiceCELoss(**base_args("losses", "dice_ce"))
    with pytest.raises(ValueError):
        standalone(logits, target, annotated)
    deferred = PartialDiceCELoss(**base_args("losses", "dice_ce"))
    deferred.defer_label_check = True
    ok_logits, ok_target, ok_annotated = _bad_label_batch("none")
    deferred(ok_logits, ok_target, ok_annotated)
    deferred.check_deferred_labels()  # a good batch: nothing to raise
    value = deferred(logits, target, annotated)  # no raise here
    deferred(ok_logits, ok_target, ok_annotated)  # a later good step does not clear it
    assert torch.isfinite(value)
    with pytest.raises(BadTrainingLabel, match=message):
        deferred.check_deferred_labels()
    deferred.check_deferred_labels()  # reported once


def test_training_module_defers_the_label_check_and_reads_it_before_saving(monkeypatch):
    from lightning_modules import losses
    from lightning_modules.losses import BadTrainingLabel
    from tests.test_loop import _module

    module = _module()
    assert module.loss_fn.defer_label_check
    monkeypatch.setattr(losses, "host_decides", lambda t: False)
    logits, target, annotated = _bad_label_batch("class")
    module.loss_fn(logits, target, annotated)
    with pytest.raises(BadTrainingLabel, match="does not annotate"):
        module.check_finite_loss()


def test_dice_ce_device_path_reads_no_value_on_the_host(monkeypatch):
    """The training loss's device path on the meta device, where tensors have no values: any host read
    (.tolist(), bool(), boolean indexing) would fail. With the label check deferred the whole forward runs."""
    from lightning_modules import losses
    from lightning_modules.losses import PartialDiceCELoss
    from tests.args import base_args

    logits, target, annotated = (t.to("meta") for t in _bad_label_batch("none"))
    loss = PartialDiceCELoss(**base_args("losses", "dice_ce"))
    assert not losses.host_decides(logits)  # meta is no CPU: the device path
    with pytest.raises(NotImplementedError, match="meta"):  # undeferred: the check reads its result on the host
        loss(logits, target, annotated)
    loss.defer_label_check = True
    value = loss(logits, target, annotated)
    assert value.device.type == "meta" and value.shape == ()


def test_a_training_step_reads_no_value_on_the_host():
    """The module's whole training step (leakage guard, network, deep-supervised loss, non-finite note,
    TrainLog) on the meta device: it completes, so it reads no tensor value on the host, i.e. on a GPU it
    queues its kernels without waiting for any (the one sync per step that remained, the label check, is
    deferred to check_finite_loss)."""
    from tests.test_loop import _module

    module = _module(test_sources=("mosmed",)).to("meta")
    _, _, annotated = _bad_label_batch("none")
    batch = {"image": torch.empty(2, 1, 16, 16, 16, device="meta"),
             "label": torch.zeros(2, 1, 16, 16, 16, dtype=torch.uint8, device="meta"),
             "annotated": annotated.to("meta"), "source": ["ctseg", "ctseg"]}
    loss = module.training_step(batch, 0)
    assert loss.device.type == "meta" and loss.shape == ()
    assert module.train_log.series["train/loss"].count == 2
