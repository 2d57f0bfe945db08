"""Re-test a finished run's checkpoint: `python -m experiments.test_run RUN_DIR --out DIR [key=value ...]`.

Rebuilds the run's data module from its `config.yaml` and the split its `plan.json` lists (older runs
without one: `run.json`'s split arguments), loads the checkpoint a selection rule chose (`--selection`,
default the run's headline) and tests it as the run did, with the trainer the overrides describe: e.g. on
2 processes (`trainer.devices=2 trainer.strategy=ddp`) or on a GPU (`trainer.accelerator=gpu`). The
predict stage writes `DIR/predictions/` (each rank its cases; `--probabilities` adds `DIR/probabilities/`),
and the score stage scores those files into `DIR/per_case.csv` and `DIR/metrics.json`: the same table
for any number of processes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import OmegaConf

from evaluation.records import RunInfo
from experiments.build import build_datamodule, configure_backends, is_rank_zero, resolve_data_root
from experiments.checkpoints import CheckpointError, load_module, read_checkpoint
from experiments.config import load_config
from experiments.plan import PLAN_FILE, read_plan
from experiments.stages.plan import plan_of
from experiments.stages.predict import predict_checkpoint
from experiments.stages.score import score_predictions, write_scores
from lightning_modules.segmentation import SegmentationModule
from rundir.cli import command_name, run_cli


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=command_name("python -m experiments.test_run"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run folder (with run.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for per_case.csv and metrics.json")
    parser.add_argument("--selection", default=None, help="which selection's checkpoint (default: the headline)")
    parser.add_argument("--probabilities", action="store_true", help="also write per-class probabilities")
    parser.add_argument("overrides", nargs="*", help="trainer/evaluation overrides, key=value")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    logging.basicConfig(level=logging.WARNING)
    info_path = args.run_dir / "run.json"
    if not info_path.exists():
        raise SystemExit(f"error: {info_path} missing: not a finished run folder")
    info = RunInfo.read(info_path)
    chosen = info.selection["checkpoints"]
    name = args.selection or info.selection["method"]
    if name not in chosen:
        raise SystemExit(f"error: {args.run_dir} recorded no {name!r} checkpoint; it has {sorted(chosen)}")
    ckpt = chosen[name]["path"]
    try:  # before the data is prepared: a crafted or damaged checkpoint ends the command at once, named
        read_checkpoint(ckpt)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    stored = OmegaConf.load(args.run_dir / "config.yaml")
    cfg = OmegaConf.merge(load_config([f"experiment={stored.experiment}"]), stored,
                          OmegaConf.from_dotlist(list(args.overrides)))
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    configure_backends(cfg)
    data_root, phantom = resolve_data_root(cfg)
    plan = read_plan(args.run_dir) if (args.run_dir / PLAN_FILE).is_file() else None
    roles = {"roles": plan["roles"]} if plan else {}
    dm = build_datamodule(cfg, data_root, **(plan["split_args"] if plan else info.split_args), **roles)
    dm.prepare_data()
    dm.setup("test")
    if plan is None:  # a run of a version before plan.json: its split, planned now
        plan = plan_of(cfg, dm, info.kind or "run", "", info.name or args.run_dir.name, info.split_args,
                       data_root, phantom)
    try:  # weights_only: a crafted checkpoint named in run.json is refused, never executed
        module = load_module(SegmentationModule, ckpt, map_location="cpu")
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    t = cfg.trainer
    # test-time methods (bn_adapt, tent) adapt with gradients inside the test loop: no inference mode for them
    trainer = pl.Trainer(inference_mode=not module.method.test_time, accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=t.precision,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(args.out))
    pred_dir = predict_checkpoint(trainer, module, dm, None, args.out, cfg.evaluation.space, args.probabilities)
    if not is_rank_zero():
        return {}
    metrics, rows = score_predictions(plan, pred_dir)
    write_scores(args.out, {**metrics, "checkpoint": ckpt, "selection": name, "world_size": trainer.world_size}, rows)
    print(f"tested {ckpt} on {trainer.world_size} process(es): {args.out / 'per_case.csv'}")
    return metrics


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.test_run"))
