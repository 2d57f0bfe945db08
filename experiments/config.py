"""Structured config (OmegaConf dataclasses, struct mode: a mistyped key is an error).

Merge order: schema <- configs/base.yaml <- configs/experiment/<name>.yaml (scale: smoke, demo; default
is the full size) <- configs/preset/<name>.yaml (a paper's protocol: sources, policies, model) <- command
line `key=value`. The schema holds types only; every number lives in YAML; the allowed ranges and the
other checks of the merged result live in experiments/config_checks.py. A choice-valued key is typed with
its enum (datamodules.choices, experiments.choices), so OmegaConf itself refuses any other value; the
value read back is the enum member, which compares, hashes and prints as its string.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.alignment import AlignmentConfig
from datamodules.choices import AugmentWhere, Normalize, OnError, Sampling
from experiments.choices import EvalSpace, SelectionMethod, WandbMode
from experiments.config_checks import apply_overrides, check_config, merge_error, split_override
from rundir.cli import command_name, debugging, did_you_mean

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


# datamodules.alignment.AlignmentConfig's fields, typed, without its defaults (the values live in base.yaml):
# derived, so a field added there cannot be forgotten here.
AlignmentSchema = make_dataclass("AlignmentSchema", [(f.name, f.type, field(default=MISSING))
                                                     for f in fields(AlignmentConfig)])


@dataclass
class DataConfig:
    sources: list[str] = MISSING
    holdout: str | None = None
    target_spacing: list[float] = MISSING
    window: list[float] = MISSING
    normalize: Normalize = MISSING
    mean: float = MISSING
    std: float = MISSING
    harmonize_off: list[str] = field(default_factory=list)  # ablation: harmonizer steps switched off
    image_flips: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> {case glob: axes}
    alignment: AlignmentSchema = field(default_factory=AlignmentSchema)
    patch_size: list[int] = MISSING
    batch_size: int = MISSING
    samples_per_epoch: int = MISSING
    fg_fraction: float = MISSING
    val_fraction: float = MISSING
    sampling: Sampling = MISSING
    num_workers: int = MISSING
    cache_workers: int = MISSING   # processes building missing harmonized cache entries
    pin_memory: bool | None = MISSING  # page-locked batches, copied to the GPU asynchronously; None: on for CUDA
    on_error: OnError = MISSING   # what a bad case file does
    policies: dict[str, str] = field(default_factory=dict)  # source -> label policy other than its default
    find_duplicates: bool = MISSING  # fingerprint labelled scans; one scan under two names is one patient
    custom_sources: list[str] = field(default_factory=list)  # YAML files describing private sources
    train_sources: list[str] = field(default_factory=list)   # transfer / few-shot protocols
    test_sources: list[str] = field(default_factory=list)
    test_fraction: float = MISSING   # share of an in-domain test source's patients held out for testing
    fixed_test_part: bool = MISSING  # every test source tests on its test_fraction part only (matrix columns)
    train_cases: dict[str, list[str]] = field(default_factory=dict)  # source -> case ids that train (few-shot)
    test_cases: dict[str, list[str]] = field(default_factory=dict)   # source -> case-id globs that test (a subset)


@dataclass
class ModelConfig:
    name: str = MISSING            # a key of `networks` (and of the NETWORKS registry)
    spatial_dims: int = MISSING
    context_slices: int = MISSING  # 2.5D: neighbouring slices per side as channels (2D networks only)


@dataclass
class LossConfig:
    name: str = MISSING            # a key of `losses` (and of the LOSSES registry)


@dataclass
class MethodConfig:
    name: str = MISSING            # a key of `methods` (and of the METHODS registry)


@dataclass
class OptimConfig:
    lr: float = MISSING
    weight_decay: float = MISSING
    cosine: bool = MISSING
    fused: bool | None = MISSING   # AdamW's fused kernel; None: where torch has one (SegmentationModule.fused_available)


@dataclass
class ProgressConfig:              # experiments.progress: when the wall-time estimate is measured
    warmup_steps: int = MISSING
    measure_steps: int = MISSING
    max_measure_s: float = MISSING


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
    keep_host_memory: bool | None = MISSING  # glibc malloc keeps freed host memory; None: on off CUDA (host_memory)
    checkpoint_every_n_steps: int = MISSING  # last.ckpt every N steps as well as every epoch (0: epochs only)
    cudnn_benchmark: bool | None = MISSING  # cuDNN picks the fastest kernels per shape; None: on for CUDA
    progress: ProgressConfig = field(default_factory=ProgressConfig)


@dataclass
class InferenceConfig:
    overlap: float = MISSING
    sw_batch_size: int = MISSING
    mode: str = MISSING


@dataclass
class EvalClassConfig:
    values: list[int] = MISSING      # common-space label values merged into this class's mask
    tolerance_mm: float = MISSING    # NSD tolerance
    # values a source must annotate for the class to be scored on it (default: every value). `lung`
    # needs only the lungs: a lung mask that contains the lesions is the whole-lung reference as it is.
    requires: list[int] | None = None
    # a lung side (values [1] or [2]) with the lesions inside it: lesion voxels join the nearer lung side
    # first, in prediction and reference (evaluation.scoring.lesions_to_lung_sides)
    lesions_by_side: bool = False


@dataclass
class SanityConfig:                  # evaluation.sanity.SanityLimits (values and their sources: base.yaml)
    total_lung_l: list[float] = MISSING
    lung_side_l: list[float] = MISSING
    lesion_outside_lung: float = MISSING
    lung_on_border: float = MISSING
    lung_in_outside_air: float = MISSING
    outside_air_hu: float = MISSING


@dataclass
class EvaluationConfig:
    space: EvalSpace = MISSING
    val_surface: bool = MISSING      # surface metrics during validation epochs
    save_predictions: bool = MISSING  # references/ beside predictions/ (always written), and overlays
    save_probabilities: bool = False  # per-class probabilities/ (float32, stored grid) beside predictions/
    overlap_scoring: bool = True  # validation: score case i in a thread while case i+1 is predicted
    classes: dict[str, EvalClassConfig] = field(default_factory=dict)
    sanity: SanityConfig = field(default_factory=SanityConfig)  # implausible predictions: warned, never rescored


@dataclass
class SelectionConfig:
    method: SelectionMethod = MISSING  # the checkpoint tested for the headline
    report: list[str] = field(default_factory=list)  # further selections tested and recorded side by side
    val_source: str | None = None  # loso selection: the training source used whole for validation


@dataclass
class AugmentConfig:
    where: AugmentWhere = MISSING  # datamodules/augment.py
    # op name -> its parameters, applied in this order (ops are a registry: names are data)
    ops: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class FewshotConfig:
    source: str = MISSING          # the source whose listed cases train and whose other cases test
    fold: int = MISSING
    task: str | None = None        # lung | infection | lung_infection (set by experiments.fewshot; names the runs)
    folds: list[list[str]] = field(default_factory=list)  # training case ids per fold


@dataclass
class WandbConfig:
    mode: WandbMode = MISSING
    project: str = MISSING
    entity: str | None = None
    group: str | None = None   # default <kind>-<experiment>; sweeps set the sweep's name
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    name: str | None = None   # default: <holdout>-<experiment>-<hash of the resolved config>
    seed: int = MISSING
    overwrite: bool = False


@dataclass
class Config:
    experiment: str = MISSING
    preset: str | None = None  # protocol preset (configs/preset/<name>.yaml), merged after the experiment
    paths: PathsConfig = field(default_factory=PathsConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # name -> arguments of every network / loss / method: names are data (registries), so these stay open
    networks: dict[str, dict[str, Any]] = field(default_factory=dict)
    loss: LossConfig = field(default_factory=LossConfig)
    losses: dict[str, dict[str, Any]] = field(default_factory=dict)
    method: MethodConfig = field(default_factory=MethodConfig)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run: RunConfig = field(default_factory=RunConfig)


def presets(kind: str = "experiment") -> list[str]:
    """Names of the scale presets (`experiment`) or the protocol presets (`preset`)."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Build the config; `experiment=NAME` selects a scale preset, `preset=NAME` a protocol preset."""
    overrides = list(overrides or [])
    chosen = {"experiment": "default", "preset": None}
    rest = []
    for item in overrides:
        key, value = split_override(item)
        if key in chosen:
            chosen[key] = None if value in ("", "null", "none") and key == "preset" else value
        else:
            rest.append(item)
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.evaluation.classes, False)  # class names are data: YAML may add any
    OmegaConf.set_struct(cfg.data.policies, False)
    OmegaConf.set_struct(cfg.data.image_flips, False)
    OmegaConf.set_struct(cfg.data.train_cases, False)
    OmegaConf.set_struct(cfg.data.test_cases, False)
    OmegaConf.set_struct(cfg.augment.ops, False)
    for group in ("networks", "losses", "methods"):
        OmegaConf.set_struct(cfg[group], False)
    cfg = _merge_file(cfg, CONFIG_DIR / "base.yaml")
    for kind in ("experiment", "preset"):
        name = chosen[kind]
        if name is None or (kind == "experiment" and name == "default"):
            continue
        path = CONFIG_DIR / kind / f"{name}.yaml"
        if not path.exists():
            what = "experiment preset" if kind == "experiment" else "protocol preset"
            raise ValueError(f"{kind}={name}: unknown {what} {name!r}{did_you_mean(name, presets(kind))}; "
                             f"available: {presets(kind)}")
        cfg = _merge_file(cfg, path)
    cfg.experiment = chosen["experiment"]
    cfg.preset = chosen["preset"]
    cfg = apply_overrides(cfg, rest)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"config values missing: {missing}")
    for key, group in (("model", "networks"), ("loss", "losses"), ("method", "methods")):
        if cfg[key].name not in cfg[group]:
            raise ValueError(f"{key}.name={cfg[key].name!r} has no arguments under `{group}` in the config"
                             f"{did_you_mean(cfg[key].name, cfg[group])}; "
                             f"configured: {sorted(cfg[group])} (python -m experiments.list shows what exists)")
    check_config(cfg)  # ranges, lengths, choices and source names, once, on the merged result
    return cfg


def _merge_file(cfg: DictConfig, path: Path) -> DictConfig:
    """`cfg` with the YAML file merged in; a value the schema refuses is one line naming the file and key."""
    try:
        return OmegaConf.merge(cfg, OmegaConf.load(path))
    except OmegaConfBaseException as e:
        raise ValueError(f"{path}: {merge_error(cfg, e)}") from None


def cli_config(parser, overrides: list[str]) -> DictConfig:
    """`load_config` for a command line: a config error (a ValueError naming the key or file) ends as one
    line `<prog>: error: ...` with exit status 2 (argparse's status, without its usage lines: the error
    names the key), not as a traceback; `--debug` (rundir.cli) raises it instead."""
    try:
        return load_config(overrides)
    except ValueError as e:
        if debugging():
            raise
        parser.exit(2, f"{command_name(parser.prog)}: error: {e}\n")


def selected_args(cfg: DictConfig, group: str, name: str) -> dict[str, Any]:
    """The arguments of entry `name` of `networks` / `losses` / `methods`, without the sweep's `search` space."""
    args = OmegaConf.to_container(cfg[group][name], resolve=True) or {}
    args.pop("search", None)
    return args
