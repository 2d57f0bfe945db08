"""Plan stage: (config, protocol split) -> `plan.json`. Discovers the sources, splits them (or takes the
split a plan file lists), harmonizes every planned case into the cache and writes the plan
(experiments.plan) into the run folder. Returns the plan and the data module serving it to training."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from datamodules.datamodule import MultiSourceDataModule
from evaluation.aggregate import eval_classes
from experiments.build import build_datamodule, harmonizer_config, is_rank_zero, say
from experiments.config import selected_args
from experiments.plan import build_plan, plan_hash, write_plan


@dataclass
class Planned:
    plan: dict                  # what plan.json holds
    dm: MultiSourceDataModule   # its data, split and cached
    split_args: dict            # the protocol's split arguments as the data module took them


def selection_split(cfg: DictConfig, split: dict) -> dict:
    """selection.method=loso validates on one training source held out whole: the split says which."""
    if cfg.selection.method != "loso":
        return split
    training = split.get("train_sources") or [s for s in cfg.data.sources if s != split.get("holdout")]
    whole = [s for s in training if s not in split.get("train_cases", {})]  # few-shot sources train their list
    if not cfg.selection.val_source and not whole:
        raise ValueError("selection.method=loso needs a training source to validate on; there is none")
    return dict(split, val_sources=[cfg.selection.val_source or whole[-1]])


def plan_stage(cfg: DictConfig, kind: str, split: dict, label: str, name: str, run_dir: Path, data_root: Path,
               phantom: bool, oracle: bool = False, roles: dict | None = None, origin: dict | None = None) -> Planned:
    """Build the split (the protocol's `split`, or exactly `roles` of a plan file), harmonize it into the
    cache, print its summary and write `run_dir/plan.json` (rank zero). `origin` records the plan file a
    run was trained from (`experiments.train --plan`)."""
    split = selection_split(cfg, split)
    dm = build_datamodule(cfg, data_root, **split, **({"roles": roles} if roles is not None else {}))
    dm.oracle = oracle
    dm.prepare_data()
    dm.setup("fit")
    say(f"split ({kind}, seed {cfg.run.seed}{', from ' + origin['path'] if origin else ''}):")
    for row in dm.split.summary():
        say(f"  {row['role']:<5} {row['source']:<12} {row['cases']:>4} cases {row['patients']:>4} patients")
    say(f"harmonized cache {dm.cache.root}: {dm.cache.misses} cases built, {dm.cache.hits} reused")
    alignment = dm.alignment()
    say("image-mask alignment (measured): " + "; ".join(
        f"{src} " + ", ".join(f"{n} {st}" for st, n in a["statuses"].items()) for src, a in alignment.items()))
    plan = plan_of(cfg, dm, kind, label, name, split, data_root, phantom, origin)
    if is_rank_zero():
        write_plan(run_dir, plan)
    if dm.skipped:
        say(f"data.on_error=skip: {len(dm.skipped)} case(s) left out (listed above and in run.json)")
    check_scorable(cfg, dm)
    return Planned(plan, dm, split)


def check_scorable(cfg: DictConfig, dm: MultiSourceDataModule) -> None:
    evaluation = OmegaConf.to_container(cfg.evaluation, enum_to_str=True)
    unscorable = sorted({c.meta["source"] for c in dm.cached["test"]} - {
        c.meta["source"] for c in dm.cached["test"] if eval_classes(evaluation, c.meta["annotated"])})
    if unscorable:
        raise ValueError(f"test source(s) {unscorable} annotate none of the evaluation classes "
                         f"{sorted(cfg.evaluation.classes)} under their label policy (data.policies picks another, "
                         "e.g. msd_lung: tumour_as_lesion)")


def plan_of(cfg: DictConfig, dm: MultiSourceDataModule, kind: str, label: str, name: str, split: dict,
            data_root: Path, phantom: bool, origin: dict | None = None) -> dict:
    """The plan stage's record (experiments.plan) of a data module whose split is built and cached, plus
    (keys added to schema v1) `label`, `config` (the resolved configuration: `experiments.train --plan`
    trains with it), `origin` (the plan file a run came from, or null) and `hash` (`plan_hash` when written:
    a reader recomputing another value knows the file was edited)."""
    d, m = cfg.data, cfg.model
    plan = build_plan(
        kind=kind, name=name, seed=int(cfg.run.seed), sources=list(d.sources), split_args=split, split=dm.split,
        cached=dm.cached, duplicates=[g.keys for g in dm.duplicates], skipped=dm.skipped, data_root=data_root,
        phantom=phantom, harmonizer=harmonizer_config(cfg).as_dict(),
        patch={"patch_size": list(d.patch_size), "batch_size": int(d.batch_size),
               "samples_per_epoch": int(d.samples_per_epoch), "fg_fraction": float(d.fg_fraction),
               "sampling": dm.sampling, "target_spacing": list(d.target_spacing)},
        network={"name": m.name, "spatial_dims": int(m.spatial_dims), "context_slices": int(m.context_slices),
                 "args": selected_args(cfg, "networks", m.name)},
        evaluation=OmegaConf.to_container(cfg.evaluation, resolve=True, enum_to_str=True))
    plan.update(label=label, config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), origin=origin)
    plan["hash"] = plan_hash(plan)
    return plan
