"""SegmentationModule: network from the registry, partial-label loss, per-source evaluation.

Validation and test run sliding-window inference on whole harmonized volumes (batch size 1) and
compute per-case metrics only for the classes the case's source annotates. Metric keys follow
`{stage}/{source}/{metric}`; `{stage}/mean/{metric}` averages the sources equally.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from monai.inferers import sliding_window_inference

from datamodules.label_policy import CLASS_INDEX, CLASSES, LESION
from datamodules.splits import check_batch_sources
from evaluation.metrics import dice, volume_ml
from lightning_modules.losses import build_loss
from lightning_modules.networks import build_network


def case_metrics(pred: np.ndarray, ref: np.ndarray, annotated: Sequence[bool], spacing: Sequence[float]) -> dict:
    """Per-case metrics in harmonized space: lesion Dice and volumes; lung Dice where lungs are annotated."""
    row = {"dice": dice(pred == LESION, ref == LESION), "ref_ml": volume_ml(ref == LESION, spacing),
           "pred_ml": volume_ml(pred == LESION, spacing)}
    lungs = [CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"]]
    if all(annotated[i] for i in lungs):
        for i in lungs:
            row[f"dice_{CLASSES[i]}"] = dice(pred == i, ref == i)
        row["dice_lung"] = float(np.mean([row["dice_lung_left"], row["dice_lung_right"]]))
    return row


def aggregate(rows: Sequence[dict], stage: str) -> dict[str, float]:
    """Mean of each metric per source, and the mean over sources (each source weighs the same)."""
    by_src: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_src[r["source"]].append(r)
    out: dict[str, float] = {}
    per_metric: dict[str, list[float]] = defaultdict(list)
    for src, rs in sorted(by_src.items()):
        for m in ("dice", "dice_lung"):
            vals = [r[m] for r in rs if m in r]
            if vals:
                out[f"{stage}/{src}/{m}"] = float(np.mean(vals))
                per_metric[m].append(out[f"{stage}/{src}/{m}"])
        out[f"{stage}/{src}/cases"] = float(len(rs))
    for m, vals in per_metric.items():
        out[f"{stage}/mean/{m}"] = float(np.mean(vals))
    return out


class SegmentationModule(pl.LightningModule):
    def __init__(self, network: dict, loss: dict, optim: dict, inference: dict, test_sources: Sequence[str] = (),
                 spatial_dims: int = 3):
        super().__init__()
        self.save_hyperparameters()
        net_kwargs = {k: v for k, v in network.items() if k != "name"}
        self.net = build_network(network["name"], spatial_dims, in_channels=1, out_channels=len(CLASSES), **net_kwargs)
        self.loss_fn = build_loss(loss["name"], **{k: v for k, v in loss.items() if k != "name"})
        self.test_sources = list(test_sources)
        self.rows: dict[str, list[dict]] = {"val": [], "test": []}
        self.last_rows: dict[str, list[dict]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        check_batch_sources(batch["source"], self.test_sources)
        logits = self(batch["image"])
        loss = self.loss_fn(logits, batch["label"], batch["annotated"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["image"].shape[0])
        return loss

    def predict_volume(self, image: torch.Tensor) -> torch.Tensor:
        inf = self.hparams.inference
        return sliding_window_inference(image, roi_size=tuple(inf["roi_size"]), sw_batch_size=inf["sw_batch_size"],
                                        predictor=self, overlap=inf["overlap"], mode=inf["mode"])

    def _eval_step(self, batch: dict, stage: str) -> None:
        logits = self.predict_volume(batch["image"])
        pred = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        ref = batch["label"][0, 0].cpu().numpy()
        row = {"case": batch["case"][0], "source": batch["source"][0]}
        row.update(case_metrics(pred, ref, batch["annotated"][0].tolist(), batch["spacing"][0].tolist()))
        self.rows[stage].append(row)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_end(self, stage: str) -> None:
        rows, self.rows[stage] = self.rows[stage], []
        self.last_rows[stage] = rows
        if self.trainer.sanity_checking or not rows:
            return
        for key, value in aggregate(rows, stage).items():
            self.log(key, value, sync_dist=False, batch_size=1)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def configure_optimizers(self):
        o = self.hparams.optim
        opt = torch.optim.AdamW(self.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
        if not o.get("cosine", True) or not self.trainer.max_epochs or self.trainer.max_epochs < 0:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
