"""SegmentationModule: network from the registry, partial-label loss, per-source evaluation.

Validation and test run sliding-window inference on whole harmonized volumes (batch size 1) and
score only the evaluation classes the case's source annotates, with `evaluation.scoring` (the same
code `experiments.evaluate` runs). Validation scores on the harmonized grid (model selection); test
scores in original geometry by default: the prediction is resampled back onto the stored grid and
compared with the stored mask, and both are written as NIfTI so anyone can re-score them. Metric keys
follow `{stage}/{source}/{metric}` (lesion) and `{metric}_{class}` for other classes;
`{stage}/mean/...` averages the sources equally.

Under DDP every rank scores its share of the cases; `_eval_end` gathers the rows of all ranks and keeps
one row per (case, class), so DistributedSampler's padding (repeated cases) never counts a case twice
and every rank logs the same exact numbers. Stage `oracle` (optional second validation loader) scores
the test cases during training, for oracle model selection (reported, never the default).
"""
from __future__ import annotations

import copy
import json
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from monai.inferers import sliding_window_inference

from datamodules.augment import Augmenter
from datamodules.harmonize import load_original, restore_to_original
from datamodules.io import spacing_of, write_volume
from datamodules.label_policy import CLASS_INDEX, CLASSES, IGNORE, ancestors, labels_from_probs
from datamodules.sources import case_from_meta, policy_named
from datamodules.splits import check_batch_sources
from evaluation.metrics import METRIC_NAMES
from evaluation.scoring import EvalClass, attach_severity, describe, score_case
from lightning_modules.losses import build_loss, class_frequencies
from lightning_modules.methods import build_method
from lightning_modules.networks import build_network


def eval_classes(evaluation: dict, annotated: Sequence[bool]) -> list[EvalClass]:
    """The configured evaluation classes this case's source annotates completely: every value of the
    class (or of its `requires` list) is annotated, or is a typed child (GGO, consolidation) of an
    annotated value in the class. A class merging a value the source leaves unlabelled would be scored
    against voxels nobody delineated; `requires` names the exceptions, e.g. whole lungs from a lung
    mask that already contains the lesions (COVID-19-CT-Seg's Lung_Mask, StructSeg's lungs)."""
    def known(v: int, values: Sequence[int]) -> bool:
        if v < len(annotated) and annotated[v]:
            return True
        return any(CLASS_INDEX[a] in values and annotated[CLASS_INDEX[a]] for a in ancestors(CLASSES[v]))

    out = []
    for name, spec in evaluation["classes"].items():
        values = [int(v) for v in spec["values"]]
        required = [int(v) for v in (spec.get("requires") or values)]
        if all(known(v, values) for v in required):
            out.append(EvalClass(name, tuple(values), float(spec["tolerance_mm"]), bool(spec.get("lesions_by_side"))))
    return out


def metric_key(stage: str, source: str, metric: str, cls: str, primary: str) -> str:
    """`{stage}/{source}/{metric}` for the primary class (lesion), `{metric}_{class}` for the others."""
    return f"{stage}/{source}/{metric}" if cls == primary else f"{stage}/{source}/{metric}_{cls}"


# Every logged mean `<key>` comes with `<key>/n` (values that entered it) and `<key>/n_undefined` (NaN values
# left out): a child of the mean's own key, so `{metric}_{class}` names stay unambiguous.
COUNT_SUFFIXES = ("/n", "/n_undefined")


def is_count(key: str) -> bool:
    return key.endswith(COUNT_SUFFIXES)


def _mean_with_counts(key: str, mean: float, n: int, n_undefined: int) -> dict[str, float]:
    return {key: mean, f"{key}/n": float(n), f"{key}/n_undefined": float(n_undefined)}


def aggregate(rows: Sequence[dict], stage: str, primary: str = "lesion") -> dict[str, float]:
    """Mean of each metric per source and class, and the mean over sources (each source weighs the same),
    each with its counts (COUNT_SUFFIXES). Undefined values (RV against an empty reference, surface metrics
    of a validation without them) are left out of the means and counted; `{stage}/mean/...` counts the
    case values of all its sources. A metric with no defined value gets no key rather than NaN."""
    by_src: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_src[r["source"]].append(r)
    out: dict[str, float] = {}
    source_means: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for src, rs in sorted(by_src.items()):
        for cls in sorted({r["class"] for r in rs}):
            for m in METRIC_NAMES:
                stats = describe(r[m] for r in rs if r["class"] == cls)
                mean_key = metric_key(stage, "mean", m, cls, primary)
                counts[mean_key][0] += stats["n"]
                counts[mean_key][1] += stats["n_undefined"]
                if stats["n"]:
                    out.update(_mean_with_counts(metric_key(stage, src, m, cls, primary), stats["mean"],
                                                 stats["n"], stats["n_undefined"]))
                    source_means[mean_key].append(stats["mean"])
        out[f"{stage}/{src}/cases"] = float(len({r["case"] for r in rs}))
    for key, vals in source_means.items():
        out.update(_mean_with_counts(key, float(np.mean(vals)), *counts[key]))
    # The model-selection score: the primary class's Dice (lesion) where it is scored; a task that scores
    # no lesion (lungs only) selects on the mean Dice of the classes it scores. Its counts are those of the
    # Dice keys it copies or averages.
    if f"{stage}/mean/dice" in out:
        out[f"{stage}/mean/selection_dice"] = out[f"{stage}/mean/dice"]
    else:
        dice = [out[k] for k in source_means if k.startswith(f"{stage}/mean/dice_")]
        if dice:
            out[f"{stage}/mean/selection_dice"] = float(np.mean(dice))
    return out


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
    seen, out = set(), []
    for r in rows:
        key = (r["source"], r["case"], r["class"])
        if key not in seen:  # a padded (repeated) case scores identically: keep the first
            seen.add(key)
            out.append(r)
    return sorted(out, key=lambda r: (r["source"], r["case"]))


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite: the run stops as failed (no `done`, no checkpoint of it)."""


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights for the main output and n-1 deeper heads: 1/2^i, normalized to sum to one."""
    w = [0.5 ** i for i in range(n)]
    return [x / sum(w) for x in w]


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
        self.test_sources = list(test_sources)
        self.rows: dict[str, list[dict]] = {"val": [], "oracle": [], "test": []}
        self.last_rows: dict[str, list[dict]] = {}
        # Set by the runner before testing: where test predictions and references are written as NIfTI.
        self.prediction_dir: Path | None = None
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

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
        check_batch_sources(batch["source"], self.test_sources)
        label = batch["label"].long()  # patches arrive as uint8
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
        extra = self.method.extra_loss(batch, self)
        if extra is not None:
            self.log("train/method_loss", extra, on_step=False, on_epoch=True, batch_size=label.shape[0])
            loss = loss + extra
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self._note_nonfinite(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["image"].shape[0])
        return loss

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        step = torch.full((), self.global_step, dtype=torch.long, device=loss.device)
        first = self._first_nonfinite if self._first_nonfinite is not None else torch.full_like(step, -1)
        self._first_nonfinite = torch.where(~torch.isfinite(loss.detach()) & (first < 0), step, first)

    def check_finite_loss(self) -> None:
        """Raise NonFiniteLoss if a training step's loss was NaN or infinite (one host sync). Called before
        each validation during fit and before every last.ckpt save (experiments.checkpoints.LastCheckpoint),
        so diverged weights are neither selected nor saved over the last good ones."""
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

    def on_test_start(self) -> None:
        """Test-time methods keep the trained state: every test source is adapted from it (`adapt_to_source`)."""
        if self.method.test_time:
            # a deep copy: state_dict() shares its tensors with the network, which adaptation changes in place
            self._trained_state = copy.deepcopy(self.net.state_dict())
            self._adapted_to = None

    def on_test_end(self) -> None:
        if self.method.test_time:
            self.net.load_state_dict(self._trained_state)  # the module leaves the test as it was trained
            self._trained_state = None

    def adapt_to_source(self, source: str) -> None:
        """Test-time methods: the trained state, adapted on every test volume of `source`, before a case of it is
        scored. Each source starts from the trained state, so its numbers never depend on which other sources
        are tested. Methods get images only: labels never leave the loader's batches. (The runner disables
        inference mode for them.)"""
        if source == self._adapted_to:
            return
        self.net.load_state_dict(self._trained_state)
        # Every DDP rank adapts on ALL the source's test volumes (the datamodule's plain loader, not the rank's
        # shard): the ranks hold one model, and the table is the same for any number of processes. A rank whose
        # padded shard returns to a source adapts to it again, deterministically the same.
        dm = getattr(self.trainer, "datamodule", None)
        loaders = [dm.test_dataloader(source)] if dm is not None else self.trainer.test_dataloaders
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
        logits = self.predict_volume(batch["image"])
        ev = self.hparams.evaluation
        classes = eval_classes(ev, batch["annotated"][0].tolist())
        space = "original" if stage == "test" and ev["space"] == "original" else "harmonized"
        row = {"case": batch["case"][0], "source": batch["source"][0], "space": space}
        if space == "original":
            scored = self._score_original(logits, batch["meta_path"][0], classes)
        else:
            pred = labels_from_probs(torch.softmax(logits[0].float(), 0)).cpu().numpy()
            ref = batch["label"][0, 0].cpu().numpy()
            surface = stage == "test" or ev.get("val_surface", False)
            scored = score_case(pred, ref, batch["spacing"][0].tolist(), classes, surface=surface, ignore=IGNORE)
        self.rows[stage].extend(dict(row, **r) for r in scored)

    def _score_original(self, logits: torch.Tensor, meta_path: str, classes: list[EvalClass]) -> list[dict]:
        """Resample the prediction onto the stored grid and score it against the stored mask there."""
        meta = json.loads((Path(meta_path) / "meta.json").read_text())
        pred = restore_to_original(torch.softmax(logits[0].float(), 0), meta)
        case = case_from_meta(meta)
        hu, ref, affine = load_original(case, policy_named(meta["policy"]) if meta.get("policy") else None)
        if ref is None:
            raise ValueError(f"{case.key}: test case without a reference mask ({case.image})")
        spacing = spacing_of(affine).tolist()
        rows = score_case(pred, ref, spacing, classes, ignore=IGNORE)
        attach_severity(rows, classes, pred, ref, spacing, hu=hu)
        if self.prediction_dir is not None:
            name = f"{case.source}/{case.case_id}.nii.gz"
            write_volume(self.prediction_dir / "predictions" / name, pred, affine)
            write_volume(self.prediction_dir / "references" / name, ref, affine)
        return rows

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        # loader 1 (when the datamodule serves it) holds the test cases: oracle selection only
        self._eval_step(batch, "val" if dataloader_idx == 0 else "oracle")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if self.method.test_time:
            self.adapt_to_source(batch["source"][0])
        self._eval_step(batch, "test")

    def _eval_end(self, stage: str) -> None:
        rows, self.rows[stage] = gather_rows(self.rows[stage]), []
        self.last_rows[stage] = rows
        if self.trainer.sanity_checking or not rows:
            return
        # rows are gathered: every rank logs the same values, no further reduction
        for key, value in aggregate(rows, stage).items():
            self.log(key, value, sync_dist=False, batch_size=1, rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")
        self._eval_end("oracle")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def configure_optimizers(self):
        o = self.hparams.optim
        opt = torch.optim.AdamW(self.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
        if not o.get("cosine", True) or not self.trainer.max_epochs or self.trainer.max_epochs < 0:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
