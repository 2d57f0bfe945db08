"""One train/validate/test experiment on a split, writing the run folder. Entry points (loso, later
transfer and fewshot) only build the config and name the split."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.datamodule import MultiSourceDataModule
from datamodules.harmonize import HarmonizerConfig
from datamodules.phantom.suite import PHANTOM_SOURCES, ensure_suite
from datamodules.sources.custom import register_custom_source
from evaluation.metrics import METRIC_NAMES
from experiments.tracking import atomic_write_text, config_hash, make_wandb_logger, write_csv, write_json
from lightning_modules.networks import required_divisor
from lightning_modules.segmentation import SegmentationModule, eval_classes

PHANTOM_BANNER = ("*** PHANTOM DATA: paths.data_root is unset, so the sources are SYNTHETIC phantoms written in "
                  "the official layouts. Numbers from this run say nothing about real CT. ***")


def resolve_data_root(cfg: DictConfig) -> tuple[Path, bool]:
    for spec in cfg.data.custom_sources:  # before anything looks a source up by name
        register_custom_source(spec)
    if cfg.paths.data_root:
        root = Path(cfg.paths.data_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"paths.data_root={root} is not a folder")
        return root, False
    unknown = [s for s in cfg.data.sources if s not in PHANTOM_SOURCES]
    if unknown:
        raise ValueError(f"no phantom profile for {unknown}; set paths.data_root to real data for these sources")
    print(PHANTOM_BANNER, flush=True)
    return ensure_suite(cfg.paths.cache, cfg.data.sources, cfg.phantom.size, cfg.phantom.seed), True


def harmonizer_config(cfg: DictConfig) -> HarmonizerConfig:
    d = cfg.data
    return HarmonizerConfig(tuple(d.target_spacing), tuple(d.window), d.normalize, d.mean, d.std)


def validate_config(cfg: DictConfig) -> None:
    if cfg.evaluation.space not in ("original", "harmonized"):
        raise ValueError(f"evaluation.space must be original or harmonized, got {cfg.evaluation.space!r}")
    if "lesion" not in cfg.evaluation.classes:
        raise ValueError("evaluation.classes must define 'lesion' (the primary class metric keys refer to)")
    div = required_divisor(cfg.model.strides)
    bad = [p for p in cfg.data.patch_size if p % div]
    if bad:
        raise ValueError(f"data.patch_size {list(cfg.data.patch_size)} must be multiples of {div} "
                         f"(product of model.strides {list(cfg.model.strides)})")


def build_datamodule(cfg: DictConfig, data_root: Path, **split) -> MultiSourceDataModule:
    d = cfg.data
    return MultiSourceDataModule(
        data_root=data_root, cache_dir=Path(cfg.paths.cache) / "harmonized", sources=list(d.sources),
        harmonizer=harmonizer_config(cfg), patch_size=list(d.patch_size), batch_size=d.batch_size,
        samples_per_epoch=d.samples_per_epoch, fg_fraction=d.fg_fraction, val_fraction=d.val_fraction,
        sampling=d.sampling, num_workers=d.num_workers, seed=cfg.run.seed, on_error=d.on_error,
        policies=OmegaConf.to_container(d.policies), find_duplicates=d.find_duplicates, **split)


def build_module(cfg: DictConfig, test_sources, trained_classes=()) -> SegmentationModule:
    m = cfg.model
    network = {"name": m.name, "channels": list(m.channels), "strides": list(m.strides),
               "num_res_units": m.num_res_units, "norm": m.norm, "dropout": m.dropout}
    inference = dict(OmegaConf.to_container(cfg.inference), roi_size=list(cfg.data.patch_size))
    return SegmentationModule(network=network, loss=OmegaConf.to_container(cfg.loss),
                              optim=OmegaConf.to_container(cfg.optim), inference=inference,
                              evaluation=OmegaConf.to_container(cfg.evaluation), test_sources=list(test_sources),
                              spatial_dims=m.spatial_dims, harmonizer=harmonizer_config(cfg).as_dict(),
                              trained_classes=list(trained_classes))


class EpochSummary(pl.Callback):
    """One line per validation epoch: readable in CI logs where progress bars are off.

    Hooked on `on_train_epoch_end`, which Lightning calls after the epoch's validation and after the
    epoch-mean training loss is reduced; earlier hooks print the previous epoch's values.
    """

    def __init__(self):
        self.validated_epoch = -1

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, module):
        # callback_metrics keep the last validation's values: show them only in the epoch that validated
        validated = self.validated_epoch == trainer.current_epoch
        parts = [f"{k}={float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items())
                 if k == "train/loss_epoch" or (validated and k.startswith("val/") and "/dice" in k)]
        print(f"[epoch {trainer.current_epoch + 1}/{trainer.max_epochs}] " + " ".join(parts), flush=True)


def make_trainer(cfg: DictConfig, run_dir: Path, loggers: list) -> tuple[pl.Trainer, pl.callbacks.ModelCheckpoint]:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="best-epoch{epoch:03d}",
                                        auto_insert_metric_name=False, monitor="val/mean/dice", mode="max",
                                        save_last=True, save_top_k=1)
    t = cfg.trainer
    trainer = pl.Trainer(max_epochs=t.max_epochs, accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
                         precision=t.precision, check_val_every_n_epoch=t.check_val_every_n_epoch,
                         log_every_n_steps=t.log_every_n_steps, deterministic=t.deterministic, logger=loggers,
                         callbacks=[ckpt, EpochSummary()], default_root_dir=str(run_dir), num_sanity_val_steps=0,
                         enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False)
    return trainer, ckpt


ROW_COLUMNS = ("split", "source", "case", "class", *METRIC_NAMES, "tolerance_mm", "space")


def write_results(run_dir: Path, metrics: dict, val_rows: list, test_rows: list, info: dict) -> None:
    write_csv(run_dir / "per_case.csv", [dict(r, split="test") for r in test_rows], first=ROW_COLUMNS)
    write_csv(run_dir / "val_per_case.csv", [dict(r, split="val") for r in val_rows], first=ROW_COLUMNS)
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "run.json", info)


def log_to_wandb(wandb_logger, metrics: dict, test_rows: list) -> None:
    import wandb

    cols = sorted({k for r in test_rows for k in r})
    run_obj = wandb_logger.experiment
    run_obj.log({"test/per_case": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in test_rows])})
    run_obj.summary.update(metrics)
    wandb.finish()


def run(cfg: DictConfig, kind: str, split: dict, label: str) -> dict:
    """Train on the split, select on validation, test the best checkpoint; write `<runs>/<kind>/<name>/`."""
    validate_config(cfg)
    name = cfg.run.name or f"{label}-{cfg.experiment}-{config_hash(cfg)}"
    run_dir = Path(cfg.paths.runs) / kind / name
    if (run_dir / "done").exists() and not cfg.run.overwrite:
        print(f"{run_dir} is already finished (run.overwrite=true to redo); its metrics:", flush=True)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        print(json.dumps(metrics, indent=1, sort_keys=True))
        return metrics
    if cfg.run.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data_root, phantom = resolve_data_root(cfg)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    dm = build_datamodule(cfg, data_root, **split)
    dm.prepare_data()
    dm.setup("fit")
    print(f"split ({kind}, seed {cfg.run.seed}):", flush=True)
    for row in dm.split.summary():
        print(f"  {row['role']:<5} {row['source']:<12} {row['cases']:>4} cases {row['patients']:>4} patients")
    print(f"harmonized cache {dm.cache.root}: {dm.cache.misses} cases built, {dm.cache.hits} reused", flush=True)
    if dm.skipped:
        print(f"data.on_error=skip: {len(dm.skipped)} case(s) left out (listed above and in run.json)", flush=True)
    if not dm.split.val:
        raise ValueError(f"the split has no validation case (data.val_fraction={cfg.data.val_fraction}): model "
                         "selection needs a training source with at least two labelled patients")

    evaluation = OmegaConf.to_container(cfg.evaluation)
    unscorable = sorted({c.meta["source"] for c in dm.cached["test"]} - {
        c.meta["source"] for c in dm.cached["test"] if eval_classes(evaluation, c.meta["annotated"])})
    if unscorable:
        raise ValueError(f"test source(s) {unscorable} annotate none of the evaluation classes "
                         f"{sorted(cfg.evaluation.classes)} under their label policy (data.policies picks another, "
                         "e.g. msd_lung: tumour_as_lesion)")
    trained = sorted({name for c in dm.cached["train"] for name, a in zip(c.meta["classes"], c.meta["annotated"]) if a})
    module = build_module(cfg, dm.split.test_sources, trained)
    tags = [f"{kind}", "phantom" if phantom else "real"] + [f"test:{s}" for s in dm.split.test_sources]
    wandb_logger = make_wandb_logger(cfg, run_dir, name, kind, tags)
    loggers = [pl.loggers.CSVLogger(str(run_dir), name="csv", version="")]
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    trainer, ckpt = make_trainer(cfg, run_dir, loggers)
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        print(f"resuming from {last}", flush=True)
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last.exists() else None)
    best = ckpt.best_model_path or str(last)
    val = trainer.validate(module, datamodule=dm, ckpt_path=best, verbose=False)[0]
    val_rows = module.last_rows["val"]
    if cfg.evaluation.save_predictions:
        module.prediction_dir = run_dir
    test = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)[0]
    test_rows = module.last_rows["test"]

    expected = {c.case_id for c in dm.split.test}
    got = list(dict.fromkeys(r["case"] for r in test_rows))
    assert sorted(got) == sorted(expected), f"tested cases {sorted(got)} differ from the split's {sorted(expected)}"
    metrics = {k: float(v) for k, v in {**val, **test}.items()}
    metrics["data"] = "phantom" if phantom else "real"
    write_results(run_dir, metrics, val_rows, test_rows, {
        "kind": kind, "name": name, "data": metrics["data"], "data_root": str(data_root),
        "experiment": cfg.experiment, "seed": int(cfg.run.seed), "config_hash": config_hash(cfg),
        "eval_space": cfg.evaluation.space,
        "best_checkpoint": best, "train_sources": list(dm.split.train_sources),
        "test_sources": list(dm.split.test_sources), "split": dm.split.summary(), "skipped": list(dm.skipped),
        "duplicates": [list(g.keys) for g in dm.duplicates], "dropped": [c.key for c in dm.split.dropped],
        "wall_s": round(time.time() - t0, 1), "torch": torch.__version__, "pytorch_lightning": pl.__version__})
    if wandb_logger is not None:
        log_to_wandb(wandb_logger, metrics, test_rows)
    atomic_write_text(run_dir / "done", time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    print(f"run folder: {run_dir}")
    for k in sorted(metrics):
        if k.startswith(("test/", "val/mean/dice")) and k.rsplit("/", 1)[-1] in ("dice", "nsd", "hd95", "dice_lung", "nsd_lung"):
            print(f"  {k} = {metrics[k]:.4f}")
    if phantom:
        print("  (phantom data: synthetic sources)")
    return metrics
