"""Config -> objects: the data root, harmonizer, data module and Lightning module a config describes, and
what a run is called and tagged. Shared by every stage (experiments.stages) and the command-line tools."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from datamodules.alignment import AlignmentConfig
from datamodules.datamodule import MultiSourceDataModule
from datamodules.harmonize import ABLATABLE_STEPS, HarmonizerConfig
from datamodules.label_policy import CLASSES
from datamodules.phantom.suite import PHANTOM_SOURCES, ensure_suite
from datamodules.sources.custom import register_custom_source
from experiments.config import selected_args
from experiments.config_checks import check_schedule
from experiments.host_memory import keep_freed_memory
from lightning_modules.methods import METHODS
from lightning_modules.networks import build_network
from lightning_modules.segmentation import SegmentationModule


def is_rank_zero() -> bool:
    """Under DDP Lightning re-runs this script once per extra rank (LOCAL_RANK/RANK set): only rank zero
    prints, writes results and logs to W&B."""
    return rank_zero_only.rank == 0


def say(*args) -> None:
    if is_rank_zero():
        print(*args, flush=True)


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
    # source names were checked by load_config (a typo gets a did-you-mean there): these are real sources
    # (e.g. a custom one) that the phantom suite cannot imitate
    unknown = [s for s in cfg.data.sources if s not in PHANTOM_SOURCES]
    if unknown:
        raise ValueError(f"paths.data_root is unset, so the sources are phantoms, and {unknown} have no phantom "
                         f"profile (phantoms exist for {sorted(PHANTOM_SOURCES)}): set paths.data_root to the "
                         "folder holding the real data")
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
    """The preflight of a run, before any data is read: settings that are each legal but cannot work
    together (config_checks.check_schedule), and the network against the patch size."""
    check_schedule(OmegaConf.to_container(cfg, resolve=True))
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


def uses_cuda(cfg: DictConfig) -> bool:
    """Whether the trainer the config describes runs on a CUDA device (Lightning's `auto` picks one when present)."""
    acc = str(cfg.trainer.accelerator).lower()
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def on_for_cuda(value: bool | None, cfg: DictConfig) -> bool:
    """A speed switch whose null means: on when training on CUDA, off elsewhere."""
    return uses_cuda(cfg) if value is None else bool(value)


def configure_backends(cfg: DictConfig) -> None:
    """Process-wide settings a run's config asks for: CPU threads, glibc's malloc keeping freed host memory
    (experiments.host_memory), and cuDNN autotuning on CUDA (the patch shape never changes during training,
    so the one-off search pays for itself in the first steps; off under trainer.deterministic, whose kernels
    must not depend on timing)."""
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    keep = cfg.trainer.keep_host_memory
    if (not uses_cuda(cfg)) if keep is None else bool(keep):
        keep_freed_memory()
    if uses_cuda(cfg):
        torch.backends.cudnn.benchmark = on_for_cuda(cfg.trainer.cudnn_benchmark, cfg) and not cfg.trainer.deterministic


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
        test_cases=OmegaConf.to_container(d.test_cases),
        pin_memory=on_for_cuda(d.pin_memory, cfg),
        augment=OmegaConf.to_container(cfg.augment, enum_to_str=True), **split)


def build_module(cfg: DictConfig, test_sources, trained_classes=(), train_sources=()) -> SegmentationModule:
    m = cfg.model
    network = {"name": m.name, "context_slices": int(m.context_slices), **selected_args(cfg, "networks", m.name)}
    # a method's needs (bn_adapt, tent: batch norm), for networks that take the argument; the others keep theirs
    for key, value in METHODS.lookup(cfg.method.name).network_overrides().items():
        if key in network and network[key] != value:
            print(f"[method {cfg.method.name}] networks.{m.name}.{key}={value} (was {network[key]}): the method needs it",
                  flush=True)
            network[key] = value
    inference = dict(OmegaConf.to_container(cfg.inference), roi_size=list(cfg.data.patch_size))
    loss = {"name": cfg.loss.name, **selected_args(cfg, "losses", cfg.loss.name)}
    return SegmentationModule(network=network, loss=loss, optim=OmegaConf.to_container(cfg.optim), inference=inference,
                              evaluation=OmegaConf.to_container(cfg.evaluation, enum_to_str=True), test_sources=list(test_sources),
                              spatial_dims=m.spatial_dims, harmonizer=harmonizer_config(cfg).as_dict(),
                              trained_classes=list(trained_classes), augment=OmegaConf.to_container(cfg.augment, enum_to_str=True),
                              method=method_config(cfg), train_sources=list(train_sources))


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
