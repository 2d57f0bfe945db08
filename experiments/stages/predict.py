"""Predict stage: one predictor for the run's test, `experiments.test_run` and `experiments.predict`.

`predict_checkpoint` runs Lightning's predict loop over a data module's test cases: `SegmentationModule.
predict_step` gives the sliding-window logits of one harmonized volume (after test-time adaptation to its
source, for bn_adapt/tent), and `CaseWriter` turns them into the case's labels in the common label space,
restored onto its stored grid (`evaluation.space=original`: `restore_to_original` with the cache entry's
meta) or on the harmonized grid (`harmonized`), and writes `predictions/<source>/<case_id>.nii.gz` (uint8,
with the grid's affine) and, when asked, `probabilities/<source>/<case_id>.nii.gz` (float32, X, Y, Z, class).
Under DDP each rank writes its own cases; all ranks meet at a barrier before anything reads them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from datamodules.harmonize import probabilities_to_original, restore_to_original
from datamodules.io import write_volume
from datamodules.label_policy import labels_from_probs
from evaluation.background import InOrderThread

PREDICTIONS = "predictions"
PROBABILITIES = "probabilities"
SPACES = ("original", "harmonized")


def prediction_path(pred_dir: Path, source: str, case_id: str) -> Path:
    return Path(pred_dir) / source / f"{case_id}.nii.gz"


def restore(logits: torch.Tensor, meta: dict, space: str = "original",
            probabilities: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Logits (1, C, *harmonized grid) -> (labels uint8, affine, probabilities or None) on the grid of `space`:
    the case's stored grid (`original`) or the harmonized one. Labels are decided by class group
    (`label_policy.decide_labels`) from the softmax probabilities."""
    if space not in SPACES:
        raise ValueError(f"evaluation.space must be one of {SPACES}, got {space!r}")
    probs = torch.softmax(logits[0].float(), 0)
    if space == "original":
        labels = restore_to_original(probs, meta)
        affine = np.asarray(meta["original"]["affine"], dtype=np.float64)
        p = probabilities_to_original(probs, meta) if probabilities else None
    else:
        labels = np.ascontiguousarray(labels_from_probs(probs).cpu().numpy(), dtype=np.uint8)
        affine = np.asarray(meta["affine"], dtype=np.float64)
        p = np.ascontiguousarray(np.moveaxis(probs.cpu().numpy(), 0, -1), dtype=np.float32) if probabilities else None
    return labels, affine, p


def write_case(out_dir: Path, source: str, case_id: str, labels: np.ndarray, affine: np.ndarray,
               probs: np.ndarray | None = None) -> Path:
    """`out_dir/predictions/<source>/<case_id>.nii.gz` (and the probabilities beside, in `probabilities/`)."""
    path = prediction_path(Path(out_dir) / PREDICTIONS, source, case_id)
    write_volume(path, np.asarray(labels, dtype=np.uint8), affine)
    if probs is not None:
        write_volume(prediction_path(Path(out_dir) / PROBABILITIES, source, case_id), probs, affine)
    return path


def read_meta(entry: str | Path) -> dict:
    return json.loads((Path(entry) / "meta.json").read_text(encoding="utf-8"))


def restore_and_write(out_dir: Path, prediction: torch.Tensor, meta: dict, space: str, probabilities: bool,
                      source: str, case_id: str) -> str:
    labels, affine, probs = restore(prediction, meta, space, probabilities)
    write_case(out_dir, source, case_id, labels, affine, probs)
    return f"{source}/{case_id}"


class CaseWriter(BasePredictionWriter):
    """Writes each predicted volume as it comes (one volume per batch): nothing is kept in memory.

    Restoring a volume to its stored grid and compressing it are CPU work: with `overlap` they run in one
    background thread (`evaluation.background`) while the next case is predicted on the device, at most two
    cases behind; `finish` waits for them (the same files as writing in turn)."""

    def __init__(self, out_dir: Path, space: str, probabilities: bool = False, overlap: bool = True):
        super().__init__(write_interval="batch")
        self.out_dir, self.space, self.probabilities = Path(out_dir), space, probabilities
        self.written: list[str] = []
        self._work = InOrderThread(overlap, max_pending=2, name="case-writer")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        meta = read_meta(batch["meta_path"][0])
        self._work.submit("cases", restore_and_write, self.out_dir, prediction, meta, self.space, self.probabilities,
                          batch["source"][0], batch["case"][0])

    def on_predict_epoch_end(self, trainer, pl_module):
        self.finish()

    def finish(self) -> list[str]:
        """Wait for the cases still being written; `written` lists every case, in prediction order."""
        self.written.extend(self._work.collect("cases"))
        return self.written

    def close(self) -> None:
        """After an interrupted predict: wait for the writing thread to end. Its own errors are not raised
        here; the predict's error is (after a complete predict, `finish` has raised them already)."""
        try:
            self._work.collect("cases")
        except Exception:
            pass


def predict_checkpoint(trainer: pl.Trainer, module: pl.LightningModule, dm, ckpt: str | None, out_dir: Path,
                       space: str, probabilities: bool = False) -> Path:
    """Predict every test case of `dm` with the weights of `ckpt` (None: the module's own) into
    `out_dir/predictions/`; returns that folder once every rank has written its cases."""
    writer = CaseWriter(out_dir, space, probabilities)
    trainer.callbacks.append(writer)
    try:
        trainer.predict(module, datamodule=dm, ckpt_path=ckpt, return_predictions=False, weights_only=True)
        writer.finish()  # every case on disk before the barrier (a no-op after on_predict_epoch_end)
    finally:
        trainer.callbacks.remove(writer)
        writer.close()
    trainer.strategy.barrier("predictions written")
    return Path(out_dir) / PREDICTIONS
