"""One train/validate/test experiment on a split, writing the run folder. Entry points (experiments.
protocols: loso, transfer, fewshot) only build the config and name the split."""
from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from datamodules.alignment import AlignmentConfig
from datamodules.datamodule import MultiSourceDataModule
from datamodules.harmonize import ABLATABLE_STEPS, HarmonizerConfig, load_original
from datamodules.label_policy import CLASSES
from datamodules.locking import folder_lock
from datamodules.phantom.suite import PHANTOM_SOURCES, ensure_suite
from datamodules.sources.custom import register_custom_source
from evaluation.metrics import METRIC_NAMES
from experiments import selection
from experiments.checkpoints import PREVIOUS, AtomicCheckpointIO, read_checkpoint, remove_stale_tmp, resume_point
from experiments.config import selected_args
from experiments.plan import build_plan, write_plan
from experiments.runfolder import mark_run_folder, remove_run_folder, run_folder
from experiments.selection import checkpoint_callbacks, chosen_checkpoint
from experiments.tracking import atomic_write_text, config_hash, make_wandb_logger, write_csv, write_json
from lightning_modules.methods import METHODS
from lightning_modules.networks import build_network
from lightning_modules.segmentation import SegmentationModule, eval_classes, is_count

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
    say(PHANTOM_BANNER)
    return ensure_suite(cfg.paths.cache, cfg.data.sources, cfg.phantom.size, cfg.phantom.seed), True


def harmonizer_config(cfg: DictConfig) -> HarmonizerConfig:
    d = cfg.data
    off = set(d.harmonize_off)
    if off - set(ABLATABLE_STEPS):
        raise ValueError(f"data.harmonize_off={list(d.harmonize_off)}: unknown step(s) {sorted(off - set(ABLATABLE_STEPS))};"
                         f" allowed: {list(ABLATABLE_STEPS)}")
    return HarmonizerConfig(tuple(d.target_spacing), tuple(d.window), "none" if "normalize" in off else d.normalize,
                            d.mean, d.std, decode="decode" not in off, resample="resample" not in off,
                            alignment=AlignmentConfig(**OmegaConf.to_container(d.alignment)))


def validate_config(cfg: DictConfig) -> None:
    if "lesion" not in cfg.evaluation.classes:
        raise ValueError("evaluation.classes must define 'lesion' (the primary class metric keys refer to)")
    check_network(cfg)


def check_network(cfg: DictConfig) -> None:
    """Build the configured network once before any data is touched: a patch size it cannot take, a
    dimensionality it does not support or a wrong argument stops the run here, naming the keys."""
    m = cfg.model
    try:
        build_network(m.name, m.spatial_dims, 1, len(CLASSES), patch_size=tuple(cfg.data.patch_size),
                      spacing=tuple(cfg.data.target_spacing), context_slices=int(m.context_slices),
                      **selected_args(cfg, "networks", m.name))
    except (ValueError, TypeError) as e:
        raise ValueError(f"model.name={m.name} ({m.spatial_dims}D) with data.patch_size={list(cfg.data.patch_size)} "
                         f"and networks.{m.name}={selected_args(cfg, 'networks', m.name)}: {e}") from None


def method_config(cfg: DictConfig) -> dict:
    return {"name": cfg.method.name, "seed": int(cfg.run.seed), **selected_args(cfg, "methods", cfg.method.name)}


def build_datamodule(cfg: DictConfig, data_root: Path, **split) -> MultiSourceDataModule:
    d = cfg.data
    return MultiSourceDataModule(
        data_root=data_root, cache_dir=Path(cfg.paths.cache) / "harmonized", sources=list(d.sources),
        harmonizer=harmonizer_config(cfg), patch_size=list(d.patch_size), batch_size=d.batch_size,
        samples_per_epoch=d.samples_per_epoch, fg_fraction=d.fg_fraction, val_fraction=d.val_fraction,
        # a method may change the sampling (source_balanced); everything else is the config's
        sampling=METHODS.lookup(cfg.method.name).data_overrides().get("sampling", d.sampling),
        num_workers=d.num_workers, seed=cfg.run.seed, on_error=d.on_error,
        policies=OmegaConf.to_container(d.policies), image_flips=OmegaConf.to_container(d.image_flips),
        find_duplicates=d.find_duplicates,
        test_fraction=d.test_fraction, fixed_test_part=d.fixed_test_part, cache_workers=d.cache_workers,
        augment=OmegaConf.to_container(cfg.augment, enum_to_str=True), **split)


def build_module(cfg: DictConfig, test_sources, trained_classes=(), train_sources=()) -> SegmentationModule:
    m = cfg.model
    network = {"name": m.name, "context_slices": int(m.context_slices), **selected_args(cfg, "networks", m.name)}
    inference = dict(OmegaConf.to_container(cfg.inference), roi_size=list(cfg.data.patch_size))
    loss = {"name": cfg.loss.name, **selected_args(cfg, "losses", cfg.loss.name)}
    return SegmentationModule(network=network, loss=loss, optim=OmegaConf.to_container(cfg.optim), inference=inference,
                              evaluation=OmegaConf.to_container(cfg.evaluation, enum_to_str=True), test_sources=list(test_sources),
                              spatial_dims=m.spatial_dims, harmonizer=harmonizer_config(cfg).as_dict(),
                              trained_classes=list(trained_classes), augment=OmegaConf.to_container(cfg.augment, enum_to_str=True),
                              method=method_config(cfg), train_sources=list(train_sources))


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
        if not trainer.is_global_zero:
            return
        # callback_metrics keep the last validation's values: show them only in the epoch that validated
        validated = self.validated_epoch == trainer.current_epoch
        parts = [f"{k}={float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items())
                 if k == "train/loss_epoch" or (validated and k.startswith("val/") and k.rsplit("/", 1)[-1].startswith("dice"))]
        print(f"[epoch {trainer.current_epoch + 1}/{trainer.max_epochs}] " + " ".join(parts), flush=True)


def make_trainer(cfg: DictConfig, run_dir: Path, loggers: list, callbacks: list, has_val: bool) -> pl.Trainer:
    t = cfg.trainer
    # without a rule's ModelCheckpoint Lightning would add a default one writing epoch=...ckpt files
    checkpointing = any(isinstance(c, pl.callbacks.Checkpoint) for c in callbacks)
    # test-time methods (bn_adapt, tent) need gradients in the test loop: no_grad there instead of inference mode
    return pl.Trainer(inference_mode=not METHODS.lookup(cfg.method.name).test_time, max_epochs=t.max_epochs,
                      accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=t.precision, check_val_every_n_epoch=t.check_val_every_n_epoch,
                      log_every_n_steps=t.log_every_n_steps, deterministic=t.deterministic, logger=loggers,
                      callbacks=[*callbacks, EpochSummary()], default_root_dir=str(run_dir), num_sanity_val_steps=0,
                      plugins=[AtomicCheckpointIO()], enable_checkpointing=checkpointing,
                      limit_val_batches=None if has_val else 0,
                      enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False)


ROW_COLUMNS = ("split", "source", "case", "class", *METRIC_NAMES, "surface_worst_case", "tolerance_mm", "space")


def is_rank_zero() -> bool:
    """Under DDP Lightning re-runs this script once per extra rank (LOCAL_RANK/RANK set): only rank zero
    prints, writes results and logs to W&B."""
    return rank_zero_only.rank == 0


def say(*args) -> None:
    if is_rank_zero():
        print(*args, flush=True)


def write_results(run_dir: Path, metrics: dict, val_rows: list, test_rows: list, info: dict) -> None:
    write_csv(run_dir / "per_case.csv", [dict(r, split="test") for r in test_rows], first=ROW_COLUMNS)
    write_csv(run_dir / "val_per_case.csv", [dict(r, split="val") for r in val_rows], first=ROW_COLUMNS)
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "run.json", info)


def check_config_unchanged(run_dir: Path, cfg: DictConfig) -> None:
    """A run folder resumed or skipped must belong to the same configuration (the name hashes the
    overrides, not code defaults): a changed default must never be mixed into old results silently."""
    stored = run_dir / "config.yaml"
    if not stored.exists():
        return
    old = config_hash(OmegaConf.load(stored))
    new = config_hash(cfg)
    if old != new:
        raise ValueError(f"{run_dir} holds a run of another configuration (config hash {old}, now {new}; compare "
                         f"{stored} with the current config): run.overwrite=true redoes it, or use another paths.runs")


def test_checkpoint(trainer: pl.Trainer, module: SegmentationModule, dm, ckpt: str) -> tuple[dict, list]:
    """Test one checkpoint; rows are gathered over DDP ranks and identical on every rank."""
    out = trainer.test(module, datamodule=dm, ckpt_path=ckpt, verbose=False, weights_only=True)
    metrics = {k: float(v) for k, v in (out[0] if out else {}).items()}
    rows = module.last_rows["test"]
    expected = {c.case_id for c in dm.split.test}
    got = list(dict.fromkeys(r["case"] for r in rows))
    assert sorted(got) == sorted(expected), f"tested cases {sorted(got)} differ from the split's {sorted(expected)}"
    return metrics, rows


def _progress_of(ckpt: str) -> tuple[int | None, int | None]:
    """(epoch, global_step) stored in a Lightning checkpoint: `epoch` is the 0-based epoch in progress when it was
    saved (the rules' checkpoints when validation ends, last.ckpt when the training epoch ends: the same
    epoch), the step identifies the weights. Read with weights_only (experiments.checkpoints): an unreadable
    or crafted file raises CheckpointError naming it."""
    state = read_checkpoint(ckpt)
    try:
        return int(state["epoch"]), int(state["global_step"])
    except (KeyError, TypeError, ValueError):
        return None, None


def select_and_test(cfg: DictConfig, trainer: pl.Trainer, module: SegmentationModule, dm, run_dir: Path,
                    callbacks: dict, names: list[str]) -> tuple[dict, list, list, dict]:
    """Validate and test the headline selection's checkpoint, then test every other selection's.
    Returns (metrics, val_rows, test_rows, selection record for run.json)."""
    head = names[0]
    record = {"method": head, "checkpoints": {}, "test": {}}
    tested: dict[str, tuple[dict, list]] = {}
    metrics, val_rows, test_rows = {}, [], []
    # Read every rule's choice now: validate/test restore callback states from the checkpoint they load,
    # which would roll a later rule's choice back to what it was when that checkpoint was written.
    chosen = {name: chosen_checkpoint(name, callbacks) for name in names}
    for name in names:
        ckpt, score = chosen[name]
        epoch, step = _progress_of(ckpt)
        record["checkpoints"][name] = {"path": ckpt, "epoch": epoch, "global_step": step, "score": score}
        if name == head:
            if dm.split.val:
                val = trainer.validate(module, datamodule=dm, ckpt_path=ckpt, verbose=False, weights_only=True)
                val_rows = module.last_rows["val"]
                metrics.update({k: float(v) for k, v in (val[0] if val else {}).items() if k.startswith("val/")})
            if cfg.evaluation.save_predictions:
                module.prediction_dir = run_dir
        same = step if step is not None else ckpt  # two rules picked the same weights: same numbers
        if same in tested and name != head:
            result = tested[same]
        else:
            result = tested[same] = test_checkpoint(trainer, module, dm, ckpt)
        module.prediction_dir = None
        if name == head:
            metrics.update(result[0])
            test_rows = result[1]
        elif is_rank_zero():
            write_csv(run_dir / "selection" / name / "per_case.csv", [dict(r, split="test") for r in result[1]],
                      first=ROW_COLUMNS)
        # the means only: their counts are in metrics.json (headline) and would triple run.json's record
        record["test"][name] = {k: v for k, v in result[0].items() if k.startswith("test/") and not is_count(k)}
    return metrics, val_rows, test_rows, record


def example_overlays(run_dir: Path, dm, n_per_source: int = 1) -> list[Path]:
    """Overlay PNGs of the saved test predictions: the most affected slice of the first case per source."""
    from experiments.predict import overlay_slices  # matplotlib only when asked

    out, seen = [], {}
    (run_dir / "overlays").mkdir(exist_ok=True)
    for case in dm.split.test:
        if seen.get(case.source, 0) >= n_per_source:
            continue
        pred_path = run_dir / "predictions" / case.source / f"{case.case_id}.nii.gz"
        if not pred_path.exists():
            continue
        seen[case.source] = seen.get(case.source, 0) + 1
        hu, _ref, affine = load_original(case, dm.adapters[case.source].policy(case))
        pred = np.asarray(nib.load(str(pred_path)).dataobj)
        out += overlay_slices(hu, pred, affine, run_dir / "overlays" / f"{case.source}_{case.case_id}", n=1)
    return out


def log_to_wandb(wandb_logger, metrics: dict, test_rows: list, selection: dict, overlays: list[Path]) -> None:
    import wandb

    cols = sorted({k for r in test_rows for k in r})
    run_obj = wandb_logger.experiment
    logged = {"test/per_case": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in test_rows])}
    sel_cols = ["selection", "checkpoint", "epoch", "score", *sorted({k for t in selection["test"].values() for k in t})]
    logged["selection/table"] = wandb.Table(columns=sel_cols, data=[
        [name, Path(c["path"]).name, c["epoch"], c["score"], *[selection["test"][name].get(k) for k in sel_cols[4:]]]
        for name, c in selection["checkpoints"].items()])
    for path in overlays:
        logged[f"overlay/{path.stem}"] = wandb.Image(str(path), caption=path.stem)
    run_obj.log(logged)
    run_obj.summary.update(metrics)
    wandb.finish()
    # the offline record log is completed by wandb's service process; teardown waits for it, so the
    # run folder is whole when this function returns (and a later run in this process starts clean)
    wandb.teardown()


def run(cfg: DictConfig, kind: str, split: dict, label: str, wait: bool = False) -> dict:
    """Train on the split, select a checkpoint, test it; write `<paths.runs>/<kind>/<name>/`.

    Re-running a finished run folder (`done`) prints its metrics; an unfinished one resumes from its
    last epoch's checkpoint with the same W&B run id. Under DDP every rank runs this function.

    The run holds its folder's lock throughout (datamodules.locking): a second process on the same folder
    gets FolderInUse ("run folder X in use by pid N"), or with `wait` (sweeps) queues behind the first.
    Only rank zero locks: the other DDP ranks re-run this script while rank zero holds it.
    """
    validate_config(cfg)
    names = selection.wanted(cfg.selection.method, cfg.selection.report)
    name = cfg.run.name or f"{label}-{cfg.experiment}-{config_hash(cfg)}"
    run_dir = run_folder(cfg.paths.runs, kind, name)
    with folder_lock(run_dir, what="run folder", wait=wait, say=say) if is_rank_zero() else nullcontext():
        return _run_locked(cfg, kind, split, name, run_dir, names)


def _run_locked(cfg: DictConfig, kind: str, split: dict, name: str, run_dir: Path, names: list[str]) -> dict:
    if cfg.run.overwrite and is_rank_zero():  # other DDP ranks start once rank 0 is writing
        remove_run_folder(run_dir)
    check_config_unchanged(run_dir, cfg)
    if (run_dir / "done").exists():
        say(f"{run_dir} is already finished (run.overwrite=true to redo); its metrics:")
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        say(json.dumps(metrics, indent=1, sort_keys=True))
        return metrics
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        mark_run_folder(run_dir)
        for tmp in remove_stale_tmp(run_dir / "checkpoints"):  # we hold the lock: their writer is dead
            say(f"removed {tmp}, left by a save that was killed")
    t0 = time.time()
    data_root, phantom = resolve_data_root(cfg)
    if is_rank_zero():
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    if cfg.selection.method == "loso":
        training = split.get("train_sources") or [s for s in cfg.data.sources if s != split.get("holdout")]
        whole = [s for s in training if s not in split.get("train_cases", {})]  # few-shot sources train their list
        if not cfg.selection.val_source and not whole:
            raise ValueError("selection.method=loso needs a training source to validate on; there is none")
        split = dict(split, val_sources=[cfg.selection.val_source or whole[-1]])
    dm = build_datamodule(cfg, data_root, **split)
    dm.oracle = "oracle" in names
    dm.prepare_data()
    dm.setup("fit")
    say(f"split ({kind}, seed {cfg.run.seed}):")
    for row in dm.split.summary():
        say(f"  {row['role']:<5} {row['source']:<12} {row['cases']:>4} cases {row['patients']:>4} patients")
    say(f"harmonized cache {dm.cache.root}: {dm.cache.misses} cases built, {dm.cache.hits} reused")
    alignment = dm.alignment()
    say("image-mask alignment (measured): " + "; ".join(
        f"{src} " + ", ".join(f"{n} {st}" for st, n in a["statuses"].items()) for src, a in alignment.items()))
    if is_rank_zero():
        write_plan(run_dir, plan_of(cfg, dm, kind, name, split, data_root, phantom))
    if dm.skipped:
        say(f"data.on_error=skip: {len(dm.skipped)} case(s) left out (listed above and in run.json)")

    evaluation = OmegaConf.to_container(cfg.evaluation, enum_to_str=True)
    unscorable = sorted({c.meta["source"] for c in dm.cached["test"]} - {
        c.meta["source"] for c in dm.cached["test"] if eval_classes(evaluation, c.meta["annotated"])})
    if unscorable:
        raise ValueError(f"test source(s) {unscorable} annotate none of the evaluation classes "
                         f"{sorted(cfg.evaluation.classes)} under their label policy (data.policies picks another, "
                         "e.g. msd_lung: tumour_as_lesion)")
    trained = sorted({n for c in dm.cached["train"] for n, a in zip(c.meta["classes"], c.meta["annotated"]) if a})
    module = build_module(cfg, dm.split.held_out, trained, dm.split.train_sources)
    wandb_logger = make_wandb_logger(cfg, run_dir, name, kind, run_tags(cfg, kind, dm.split, phantom))
    loggers = [pl.loggers.CSVLogger(str(run_dir), name="csv", version="")]
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    callbacks = checkpoint_callbacks(run_dir, names, bool(dm.split.val), int(cfg.trainer.checkpoint_every_n_steps))
    trainer = make_trainer(cfg, run_dir, loggers, list(callbacks.values()), bool(dm.split.val) or dm.oracle)
    resume, finished, mid_epoch = resume_point(run_dir / "checkpoints", module, say, repair=is_rank_zero())
    if resume is not None:
        say(f"resuming from epoch {finished}{mid_epoch} ({resume})")
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    metrics, val_rows, test_rows, sel = select_and_test(cfg, trainer, module, dm, run_dir, callbacks, names)
    if not is_rank_zero():
        return metrics
    metrics["data"] = "phantom" if phantom else "real"
    write_results(run_dir, metrics, val_rows, test_rows, {
        "kind": kind, "name": name, "data": metrics["data"], "data_root": str(data_root),
        "experiment": cfg.experiment, "preset": cfg.preset, "seed": int(cfg.run.seed), **variant(cfg),
        **({"task": cfg.fewshot.task, "fold": int(cfg.fewshot.fold)} if kind == "fewshot" else {}),
        "config_hash": config_hash(cfg), "eval_space": str(cfg.evaluation.space),
        "best_checkpoint": sel["checkpoints"][names[0]]["path"], "selection": sel,
        "train_sources": list(dm.split.train_sources), "test_sources": list(dm.split.test_sources),
        "split_args": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in split.items()},
        "split": dm.split.summary(), "skipped": list(dm.skipped), "alignment": alignment,
        "duplicates": [list(g.keys) for g in dm.duplicates], "dropped": [c.key for c in dm.split.dropped],
        "world_size": trainer.world_size, "wall_s": round(time.time() - t0, 1), "torch": torch.__version__,
        "pytorch_lightning": pl.__version__})
    if wandb_logger is not None:
        overlays = example_overlays(run_dir, dm) if cfg.evaluation.save_predictions else []
        log_to_wandb(wandb_logger, metrics, test_rows, sel, overlays)
    atomic_write_text(run_dir / "done", time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    (run_dir / "checkpoints" / PREVIOUS).unlink(missing_ok=True)  # the fallback is needed while training only
    print(f"run folder: {run_dir}")
    for k in sorted(metrics):
        if k.startswith(("test/", "val/mean/dice")) and k.rsplit("/", 1)[-1] in ("dice", "nsd", "hd95", "dice_lung", "nsd_lung"):
            print(f"  {k} = {metrics[k]:.4f}")
    for n in names[1:]:
        print(f"  selection {n}: test/mean/selection_dice = {sel['test'][n].get('test/mean/selection_dice', float('nan')):.4f} "
              f"(epoch {sel['checkpoints'][n]['epoch']})")
    if phantom:
        print("  (phantom data: synthetic sources)")
    return metrics


def plan_of(cfg: DictConfig, dm: MultiSourceDataModule, kind: str, name: str, split: dict, data_root: Path,
            phantom: bool) -> dict:
    """The plan stage's record (experiments.plan) of a data module whose split is built and cached."""
    d, m = cfg.data, cfg.model
    return build_plan(
        kind=kind, name=name, seed=int(cfg.run.seed), sources=list(d.sources), split_args=split, split=dm.split,
        cached=dm.cached, duplicates=[g.keys for g in dm.duplicates], skipped=dm.skipped, data_root=data_root,
        phantom=phantom, harmonizer=harmonizer_config(cfg).as_dict(),
        patch={"patch_size": list(d.patch_size), "batch_size": int(d.batch_size),
               "samples_per_epoch": int(d.samples_per_epoch), "fg_fraction": float(d.fg_fraction),
               "sampling": dm.sampling, "target_spacing": list(d.target_spacing)},
        network={"name": m.name, "spatial_dims": int(m.spatial_dims), "context_slices": int(m.context_slices),
                 "args": selected_args(cfg, "networks", m.name)},
        evaluation=OmegaConf.to_container(cfg.evaluation, resolve=True))


def variant(cfg: DictConfig) -> dict:
    """What the run trained, by registry name: the report keeps runs of different methods, networks, losses or
    harmonizer steps switched off apart (run.json; older runs without these keys read as the defaults).
    `harmonize_off` is `none` (every step ran) or the steps switched off, in harmonizer order, joined by `+`."""
    off = [s for s in ABLATABLE_STEPS if s in cfg.data.harmonize_off]
    return {"method": cfg.method.name, "network": f"{cfg.model.name}{cfg.model.spatial_dims}d"
            + (f"+{cfg.model.context_slices}" if cfg.model.context_slices else ""), "loss": cfg.loss.name,
            "harmonize_off": "+".join(off) or "none"}


def run_tags(cfg: DictConfig, kind: str, split, phantom: bool) -> list[str]:
    """W&B tags: filter a dashboard by protocol, data, held-out/test/train source, model and selection."""
    v = variant(cfg)
    tags = [kind, "phantom" if phantom else "real", f"model:{v['network']}", f"method:{v['method']}",
            f"loss:{v['loss']}", f"selection:{cfg.selection.method}", f"experiment:{cfg.experiment}"]
    if v["harmonize_off"] != "none":
        tags.append(f"harmonize_off:{v['harmonize_off']}")
    tags += [f"holdout:{s}" for s in split.held_out] + [f"train:{s}" for s in split.train_sources]
    tags += [f"test:{s}" for s in split.test_sources]
    if cfg.preset:
        tags.append(f"preset:{cfg.preset}")
    return tags
