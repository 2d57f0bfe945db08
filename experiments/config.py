"""Structured config (OmegaConf dataclasses, struct mode: a mistyped key is an error).

Merge order: schema <- configs/base.yaml <- configs/experiment/<name>.yaml <- command line `key=value`.
The schema holds types only; every number lives in YAML.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass
class PathsConfig:
    data_root: str | None = None   # folder with one sub-folder per source; unset: phantom suite
    cache: str = MISSING
    runs: str = MISSING


@dataclass
class PhantomConfig:
    size: str = MISSING
    seed: int = MISSING


@dataclass
class DataConfig:
    sources: list[str] = MISSING
    holdout: str | None = None
    target_spacing: list[float] = MISSING
    window: list[float] = MISSING
    normalize: str = MISSING
    mean: float = MISSING
    std: float = MISSING
    patch_size: list[int] = MISSING
    batch_size: int = MISSING
    samples_per_epoch: int = MISSING
    fg_fraction: float = MISSING
    val_fraction: float = MISSING
    sampling: str = MISSING
    num_workers: int = MISSING
    on_error: str = MISSING   # fail | skip: what a bad case file does
    policies: dict[str, str] = field(default_factory=dict)  # source -> label policy other than its default
    find_duplicates: bool = MISSING  # fingerprint labelled scans; one scan under two names is one patient
    custom_sources: list[str] = field(default_factory=list)  # YAML files describing private sources


@dataclass
class ModelConfig:
    name: str = MISSING
    spatial_dims: int = MISSING
    channels: list[int] = MISSING
    strides: list[int] = MISSING
    num_res_units: int = MISSING
    norm: str = MISSING
    dropout: float = MISSING


@dataclass
class LossConfig:
    name: str = MISSING
    ce_weight: float = MISSING
    dice_weight: float = MISSING


@dataclass
class OptimConfig:
    lr: float = MISSING
    weight_decay: float = MISSING
    cosine: bool = MISSING


@dataclass
class TrainerConfig:
    max_epochs: int = MISSING
    accelerator: str = MISSING
    devices: Any = MISSING
    strategy: str = MISSING
    precision: str = MISSING
    check_val_every_n_epoch: int = MISSING
    log_every_n_steps: int = MISSING
    deterministic: bool = MISSING
    threads: int = MISSING   # torch CPU threads; 0 leaves torch's default


@dataclass
class InferenceConfig:
    overlap: float = MISSING
    sw_batch_size: int = MISSING
    mode: str = MISSING


@dataclass
class EvalClassConfig:
    values: list[int] = MISSING      # common-space label values merged into this class's mask
    tolerance_mm: float = MISSING    # NSD tolerance


@dataclass
class EvaluationConfig:
    space: str = MISSING             # original | harmonized
    val_surface: bool = MISSING      # surface metrics during validation epochs
    save_predictions: bool = MISSING
    classes: dict[str, EvalClassConfig] = field(default_factory=dict)


@dataclass
class WandbConfig:
    mode: str = MISSING        # offline | online | disabled
    project: str = MISSING
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    name: str | None = None   # default: <holdout>-<experiment>-<hash of the resolved config>
    seed: int = MISSING
    overwrite: bool = False


@dataclass
class Config:
    experiment: str = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run: RunConfig = field(default_factory=RunConfig)


def presets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Build the config; `experiment=NAME` among the overrides selects a preset."""
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
    experiment = "default"
    rest = []
    for item in overrides:
        key, value = item.split("=", 1)
        if key == "experiment":
            experiment = value
        else:
            rest.append(item)
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.evaluation.classes, False)  # class names are data: YAML may add any
    OmegaConf.set_struct(cfg.data.policies, False)
    cfg = OmegaConf.merge(cfg, OmegaConf.load(CONFIG_DIR / "base.yaml"))
    if experiment != "default":
        path = CONFIG_DIR / "experiment" / f"{experiment}.yaml"
        if not path.exists():
            raise ValueError(f"unknown experiment preset {experiment!r}; available: {presets()}")
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    cfg.experiment = experiment
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"config values missing: {missing}")
    return cfg
