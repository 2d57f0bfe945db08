"""SegmentationModule: network from the registry, partial-label loss, validation scores, predictions.

The module reads no case files and writes none. Validation (and oracle selection) runs sliding-window
inference on whole harmonized volumes (batch size 1) and scores, in memory on the harmonized grid, only
the evaluation classes the case's source annotates, with `evaluation.scoring` (the same code the score
stage and `experiments.evaluate` run). Testing is `predict_step`: the logits of one harmonized volume
(after test-time adaptation to its source, for bn_adapt/tent); the predict stage (`experiments.stages.
predict`) restores them to the case's stored grid and writes them, and the score stage scores the files.
Metric keys follow `{stage}/{source}/{metric}` (lesion) and `{metric}_{class}` for other classes;
`{stage}/mean/...` averages the sources equally (`evaluation.aggregate`).

Under DDP every rank scores its share of the validation cases; `_eval_end` gathers the rows of all ranks
and keeps one row per (case, class), so DistributedSampler's padding (repeated cases) never counts a case
twice and every rank logs the same exact numbers. Stage `oracle` (optional second validation loader)
scores the test cases during training, for oracle model selection (reported, never the default).
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.apply_func import move_data_to_device
from monai.inferers import sliding_window_inference

from datamodules.augment import Augmenter
from datamodules.label_policy import CLASSES, IGNORE, labels_from_probs
from datamodules.splits import check_batch_sources
from evaluation.aggregate import COUNT_SUFFIXES, aggregate, eval_classes, is_count, metric_key, unique_rows
from evaluation.background import InOrderThread
from evaluation.scoring import score_case
from lightning_modules.losses import build_loss, class_frequencies
from lightning_modules.methods import build_method
from lightning_modules.networks import build_network
from lightning_modules.train_logging import TrainLog

# evaluation-side since the stages split; imported from here by older code
__all__ = ["SegmentationModule", "NonFiniteLoss", "aggregate", "eval_classes", "is_count", "metric_key",
           "COUNT_SUFFIXES", "gather_rows", "deep_supervision_weights"]

# Lightning suggests sync_dist for epoch-level logs under DDP; our values are computed from rows already
# gathered from every rank (identical everywhere), and a sync would average equal numbers: silence it.
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
# Lightning warns that DistributedSampler repeats cases in validate/test; gather_rows removes the repeats.
warnings.filterwarnings("ignore", message=r".*it is recommended to use `Trainer\(devices=1, num_nodes=1\)`.*")


def gather_rows(rows: list[dict]) -> list[dict]:
    """All ranks' rows, one per (source, case, class), in a rank-independent order (by source and case,
    classes in scoring order): the same table whatever the number of processes."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, rows)
        rows = [r for part in parts for r in part]
    return unique_rows(rows)


def _score_rows(row: dict, pred, ref, spacing, classes, surface: bool) -> list[dict]:
    return [dict(row, **r) for r in score_case(pred, ref, spacing, classes, surface=surface, ignore=IGNORE)]


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite: the run stops as failed (no `done`, no checkpoint of it)."""


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights for the main output and n-1 deeper heads: 1/2^i, normalized to sum to one."""
    w = [0.5 ** i for i in range(n)]
    return [x / sum(w) for x in w]


def flat_batch(batch) -> bool:
    """A dict whose values are tensors or lists/tuples of strings (what the patch and volume loaders give)."""
    return isinstance(batch, dict) and all(
        isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v))
        for v in batch.values())


def fused_available(params) -> bool:
    """Whether torch has a fused AdamW for `params`: floating point, all on CPUs or all on CUDA devices.

    Why fused by default (`optim.fused: null`): the default implementation on a CPU updates one parameter
    tensor after another (the default UNet's 63 tensors: 28 ms a step on 2 cores, fused 4 ms) and on a GPU
    launches a few kernels per group of tensors; the fused kernel does all in one pass. The update is the
    same formula; results agree within float rounding (not bit for bit), so `optim.fused` is not hashed."""
    kinds = {p.device.type for p in params}
    return bool(params) and len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


class SegmentationModule(pl.LightningModule):
    def __init__(self, network: dict, loss: dict, optim: dict, inference: dict, evaluation: dict,
                 test_sources: Sequence[str] = (), spatial_dims: int = 3, harmonizer: dict | None = None,
                 trained_classes: Sequence[str] = (), augment: dict | None = None, method: dict | None = None,
                 train_sources: Sequence[str] = ()):
        # harmonizer and trained_classes are recorded for `experiments.predict`: a checkpoint alone must
        # say how to prepare an input and which output channels were ever supervised.
        super().__init__()
        self.save_hyperparameters()
        net_kwargs = {k: v for k, v in network.items() if k not in ("name", "context_slices")}
        spacing = (harmonizer or {}).get("target_spacing") or [1.0, 1.0, 1.0]
        self.net = build_network(network["name"], spatial_dims, 1, len(CLASSES),
                                 patch_size=tuple(int(s) for s in inference["roi_size"][:spatial_dims]),
                                 spacing=tuple(float(s) for s in spacing[:spatial_dims]),
                                 context_slices=int(network.get("context_slices", 0)), **net_kwargs)
        self.loss_fn = build_loss(loss["name"], **{k: v for k, v in loss.items() if k != "name"})
        if hasattr(self.loss_fn, "defer_label_check"):
            # on a GPU its label check is read in check_finite_loss, not in every step (losses.PartialDiceCELoss)
            self.loss_fn.defer_label_check = True
        self.test_sources = list(test_sources)
        self.rows: dict[str, list[dict]] = {"val": [], "oracle": []}
        # validation scoring (CPU) of case i beside the prediction of case i+1 (evaluation.background)
        self.scoring = InOrderThread(bool(evaluation.get("overlap_scoring", True)), name="val-scoring")
        self.last_rows: dict[str, list[dict]] = {}
        # augment.where == device: training batches are augmented after the transfer, i.e. on the GPU
        # when training on one (the loader then only crops); loader-side augmentation is the dataset's
        augment = dict(augment or {})
        self.augmenter = Augmenter(augment.get("ops")) if augment.get("where") == "device" else None
        method = dict(method or {"name": "erm"})
        self.method = build_method(method.pop("name"), **method)
        self.method.attach(self)
        # test-time methods, while testing: the trained network state and the test source it is adapted to
        self._trained_state: dict | None = None
        self._adapted_to: str | None = None
        # first global step whose training loss was not finite (-1: none yet), kept on the loss's device:
        # recording it costs no host sync; check_finite_loss reads it before validation and checkpoints
        self._first_nonfinite: torch.Tensor | None = None
        # training values (loss, method terms) stay on the device until Lightning writes them: one
        # `self.log` per logged step instead of one per step (lightning_modules.train_logging)
        self.train_log = TrainLog()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # The leakage guard on the host batch, before anything is copied: a batch carrying a held-out source
        # never reaches the device, and the check reads a list of strings, never a device tensor.
        if self._trainer is not None and self._trainer.training:
            check_batch_sources(batch["source"], self.test_sources)
        return batch

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # A patch batch is a flat dict of tensors and per-sample lists of strings (source, case, meta_path):
        # Lightning's own move (its non_blocking rule included) is applied to each tensor alone. Handed the
        # whole batch, its generic walk (apply_to_collection) visits every string of every list and took
        # ~0.2 ms a step (docs/gpu.md). Any other structure: Lightning's, whole.
        if flat_batch(batch):
            return {k: move_data_to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self._trainer is not None and self._trainer.training:
            batch = dict(batch)
            if self.augmenter:
                batch["image"], batch["label"] = self.augmenter(batch["image"], batch["label"])
            batch = self.method.transform_batch(batch, self)
        return batch

    def on_fit_start(self) -> None:
        # frequency-weighted losses (weighted_ce, soft_kl) get the training split's class frequencies, on
        # every start (they are not stored in checkpoints: a resumed run recomputes the same values)
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(self.loss_fn, "needs_frequencies", False) and dm is not None:
            self.loss_fn.set_class_frequencies(class_frequencies(*dm.class_counts(len(CLASSES))))

    def training_loss(self, batch: dict) -> torch.Tensor:
        """Segmentation loss over every output head (deep supervision, nnU-Net weights), on the slices whose
        2.5D context is complete, plus the method's own term."""
        # again at the point of use (methods and tests call this directly); a list of strings: no device sync
        check_batch_sources(batch["source"], self.test_sources)
        # patches arrive as uint8 and stay so: dice_ce builds its one-hot from them (losses.target_onehot); the
        # other losses widen inside prepare_target. Widening here cost most of a step's overhead (docs/gpu.md).
        label = batch["label"]
        self.method.begin_step(batch, self)  # e.g. each sample's source, for feature hooks that pair sources
        heads = self.net.heads(batch["image"])
        m = self.net.margin
        if m:
            if label.shape[-1] <= 2 * m:
                raise ValueError(f"patch depth {label.shape[-1]} leaves no slice with {m} neighbours on each side "
                                 "(model.context_slices): make data.patch_size[2] larger")
            heads = [h[..., m:-m] for h in heads]
            label = label[..., m:-m]
        loss = sum(w * self.loss_fn(h, label, batch["annotated"])
                   for w, h in zip(deep_supervision_weights(len(heads)), heads))
        extra = self.method.extra_loss(batch, self, heads[0])
        if extra is not None:
            self.train_log.add("train/method_loss", extra, label.shape[0])
            loss = loss + extra
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self._note_nonfinite(loss)
        self.train_log.add("train/loss", loss, batch["image"].shape[0], per_step=True)
        return loss

    def on_train_epoch_start(self) -> None:
        self.train_log.reset_epoch()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # train/loss_step at the steps Lightning writes, train/loss_epoch (and method terms) at the epoch's end
        self.train_log.flush(self, batch_idx)

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        step = torch.full((), self.global_step, dtype=torch.long, device=loss.device)
        first = self._first_nonfinite if self._first_nonfinite is not None else torch.full_like(step, -1)
        self._first_nonfinite = torch.where(~torch.isfinite(loss.detach()) & (first < 0), step, first)

    def check_finite_loss(self) -> None:
        """Raise NonFiniteLoss if a training step's loss was NaN or infinite (one host sync). Called before
        each validation during fit and before every last.ckpt save (experiments.checkpoints.LastCheckpoint),
        so diverged weights are neither selected nor saved over the last good ones. First, the loss's deferred
        label check (on a GPU: a bad training label raises losses.BadTrainingLabel here, not in its step)."""
        check_labels = getattr(self.loss_fn, "check_deferred_labels", None)
        if check_labels is not None:
            check_labels()
        if self._first_nonfinite is None or int(self._first_nonfinite) < 0:
            return
        step = int(self._first_nonfinite)
        o = self.hparams.optim
        raise NonFiniteLoss(
            f"training loss became NaN/inf at global step {step} (epoch {self.current_epoch + 1}); the run stops as "
            f"failed, without `done`. Likely causes: a learning rate too high (optim.lr={o['lr']}), a zero or tiny "
            "data.std with data.normalize=zscore, or NaN/inf voxels in a training case (python -m datamodules.verify "
            "--root DATA checks the data). No checkpoint holds weights from after it.")

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":  # validation inside fit: never score (or select) diverged weights
            self.check_finite_loss()

    def on_predict_start(self) -> None:
        """Test-time methods keep the trained state: every test source is adapted from it (`adapt_to_source`)."""
        if self.method.test_time:
            # a deep copy: state_dict() shares its tensors with the network, which adaptation changes in place
            self._trained_state = copy.deepcopy(self.net.state_dict())
            self._adapted_to = None

    def on_predict_end(self) -> None:
        if self.method.test_time and self._trained_state is not None:
            self.net.load_state_dict(self._trained_state)  # the module leaves the test as it was trained
            self._trained_state = None

    def adapt_to_source(self, source: str) -> None:
        """Test-time methods: the trained state, adapted on every test volume of `source`, before a case of it is
        predicted. Each source starts from the trained state, so its numbers never depend on which other sources
        are tested. Methods get images only: labels never leave the loader's batches. (The trainer runs without
        inference mode for them.)"""
        if source == self._adapted_to:
            return
        self.net.load_state_dict(self._trained_state)
        # Every DDP rank adapts on ALL the source's test volumes (the datamodule's plain loader, not the rank's
        # shard): the ranks hold one model, and the table is the same for any number of processes.
        dm = getattr(self.trainer, "datamodule", None)
        loaders = [dm.test_dataloader(source)] if dm is not None else self.trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        seen = []

        def images():
            for loader in loaders:
                for b in loader:
                    if b["source"][0] == source:  # volumes come one per batch (a plain loader holds every source)
                        seen.append(1)
                        yield b["image"].to(self.device)

        with torch.enable_grad():
            self.method.adapt(self, images())
        self._adapted_to = source
        if self.trainer.is_global_zero:
            print(f"[method {(self.hparams.method or {}).get('name', 'erm')}] adapted on {len(seen)} unlabelled test "
                  f"volume(s) of {source}", flush=True)

    def predict_volume(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits; channels of classes no training source annotated are -inf.

        The marginal loss never supervises such a channel (it is merged with background everywhere), so
        its logit carries no meaning and must not win a decision: a model trained without lung labels
        predicts no lungs rather than noise. Labels are decided by class group (`labels_from_probs`).
        """
        inf = self.hparams.inference
        roi = tuple(inf["roi_size"])
        if self.hparams.spatial_dims == 2:
            # slice-wise networks see whole slabs along z (-1: the full depth), so every slice has its true
            # 2.5D neighbours and no window seam crosses the slice axis
            roi = (*roi[:2], -1)
        logits = sliding_window_inference(image, roi_size=roi, sw_batch_size=inf["sw_batch_size"],
                                          predictor=self, overlap=inf["overlap"], mode=inf["mode"])
        trained = self.hparams.get("trained_classes") or ()
        if trained:
            allowed = torch.tensor([i == 0 or c in trained for i, c in enumerate(CLASSES)], device=logits.device)
            logits = logits.masked_fill(~allowed.view(1, -1, *([1] * (logits.dim() - 2))), float("-inf"))
        return logits

    def _eval_step(self, batch: dict, stage: str) -> None:
        """Score one validation (or oracle) volume in memory on the harmonized grid."""
        logits = self.predict_volume(batch["image"])
        ev = self.hparams.evaluation
        classes = eval_classes(ev, batch["annotated"][0].tolist())
        row = {"case": batch["case"][0], "source": batch["source"][0], "space": "harmonized"}
        pred = labels_from_probs(torch.softmax(logits[0].float(), 0)).cpu().numpy()
        ref = batch["label"][0, 0].cpu().numpy()
        # scored on the CPU beside the next case's prediction (self.scoring); _eval_end collects the rows
        self.scoring.submit(stage, _score_rows, row, pred, ref, batch["spacing"][0].tolist(), classes,
                            ev.get("val_surface", False))

    def scored_rows(self, stage: str) -> list[dict]:
        """This rank's rows of `stage` so far, once the scoring in progress has finished."""
        self.rows[stage].extend(r for rows in self.scoring.collect(stage) for r in rows)
        return self.rows[stage]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        # loader 1 (when the datamodule serves it) holds the test cases: oracle selection only
        self._eval_step(batch, "val" if dataloader_idx == 0 else "oracle")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The logits of one harmonized test volume (1, C, *grid), after adapting a test-time method to the
        volume's source; the predict stage's writer restores and writes them."""
        if self.method.test_time:
            self.adapt_to_source(batch["source"][0])
        return self.predict_volume(batch["image"])

    def _eval_end(self, stage: str) -> None:
        rows, self.rows[stage] = gather_rows(self.scored_rows(stage)), []
        self.last_rows[stage] = rows
        if self.trainer.sanity_checking or not rows:
            return
        # rows are gathered: every rank logs the same values, no further reduction
        for key, value in aggregate(rows, stage).items():
            self.log(key, value, sync_dist=False, batch_size=1, rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")
        self._eval_end("oracle")

    def configure_optimizers(self):
        o = self.hparams.optim
        params = list(self.parameters())
        fused = o.get("fused")
        opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"],
                                fused=fused_available(params) if fused is None else bool(fused))
        if not o.get("cosine", True) or not self.trainer.max_epochs or self.trainer.max_epochs < 0:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
