"""Checks of a merged config, run once by `experiments.config.load_config`: every error is one line that
names the dotted key, the value and what is allowed.

Why here and not where a value is used: a value out of range (e.g. `data.std=0`, a NaN loss after an
hour of caching) or a typo'd source under `data.policies` (silently ignored) must stop the run before
any data is touched, and a message from deep inside a loader names neither the key nor the override.

- `apply_overrides`: command-line `key=value` items merged one at a time, so an error names its item;
  OmegaConf's multi-line errors become one line (unknown key: the keys that exist there; a scalar
  where a list goes: how to write the list).
- `RANGES` (data): dotted key (a `*` segment matches any one name) -> interval in the usual notation,
  `[` / `]` closed and `(` / `)` open. A list value is checked element by element; `LENGTHS` fixes
  the number of elements of the per-axis lists.
- Choice-valued keys are enums in the schema (experiments/config.py): OmegaConf refuses another value
  at merge time, and `choice_message` words that refusal like every other error here.
- `check_config`: ranges, lengths, a few relations (window low < high, an existing few-shot fold),
  the lists of choices (selection.report, data.harmonize_off), every entry of `networks` / `losses` /
  `methods` against its registered params dataclass, and every source name the config mentions.
"""
from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    InterpolationValidationError,
    OmegaConfBaseException,
    ValidationError,
)

from datamodules.label_policy import CLASSES
from rundir.cli import closest, did_you_mean

# Label values of the common space (evaluation.classes.*.values / requires).
_LABELS = f"[0, {len(CLASSES) - 1}]"

RANGES: dict[str, str] = {
    "phantom.seed": "[0, inf)",
    "data.target_spacing": "(0, inf)",          # mm per axis
    "data.std": "(0, inf)",                     # zscore divides by it: 0 is a NaN loss
    "data.alignment.grid_mm": "(0, inf)",
    "data.alignment.shell_mm": "(0, inf)",
    "data.alignment.margin": "[0, 1]",          # a difference of scores in [0, 1]
    "data.alignment.min_lung_ml": "[0, inf)",
    "data.alignment.min_lesion_ml": "[0, inf)",
    "data.alignment.lesion_excess_hu": "[0, inf)",
    "data.alignment.field_closing_mm": "[0, inf)",
    "data.patch_size": "[1, inf)",
    "data.batch_size": "[1, inf)",
    "data.samples_per_epoch": "[1, inf)",
    "data.fg_fraction": "[0, 1]",
    "data.val_fraction": "[0, 1)",              # 0: no validation part (selection.method=last); 1 leaves nothing to train
    "data.test_fraction": "[0, 1)",
    "data.num_workers": "[0, inf)",
    "data.cache_workers": "[0, inf)",           # 0 or 1: in the run's process
    "model.spatial_dims": "[2, 3]",
    "model.context_slices": "[0, inf)",
    "optim.lr": "(0, inf)",
    "optim.weight_decay": "[0, inf)",
    "trainer.max_epochs": "[1, inf)",
    "trainer.check_val_every_n_epoch": "[1, inf)",
    "trainer.log_every_n_steps": "[1, inf)",
    "trainer.threads": "[0, inf)",              # 0: torch's default
    "inference.overlap": "[0, 1)",              # sliding-window overlap: 1 would never advance
    "inference.sw_batch_size": "[1, inf)",
    "evaluation.classes.*.values": _LABELS,
    "evaluation.classes.*.requires": _LABELS,
    "evaluation.classes.*.tolerance_mm": "[0, inf)",
    "fewshot.fold": "[0, inf)",                 # and below len(fewshot.folds): check_config
    "run.seed": "[0, 4294967295]",              # what Lightning's seed_everything takes
    # registry arguments: the entries a sweep or a user is most likely to set by hand
    "augment.ops.*.p": "[0, 1]",
    "augment.ops.intensity.scale": "[0, inf)",
    "augment.ops.intensity.shift": "[0, inf)",
    "augment.ops.noise.std": "[0, inf)",
    "networks.*.dropout": "[0, 1)",
    "losses.*.smooth": "(0, inf)",              # the denominators' guard against empty masks
    "losses.*.ce_weight": "[0, inf)",
    "losses.*.dice_weight": "[0, inf)",
    "losses.focal.gamma": "[0, inf)",
    "losses.soft_kl.sigma": "(0, inf)",
    "methods.*.p": "[0, 1]",
    "methods.*.weight": "[0, inf)",
    "methods.*.layers": "[1, inf)",
    "methods.*.crops_per_case": "[1, inf)",
    "methods.*.steps": "[1, inf)",
    "methods.*.lr": "(0, inf)",
}

# Per-axis lists: (x, y, z) after reorientation to RAS, a (low, high) HU window.
LENGTHS: dict[str, int] = {"data.target_spacing": 3, "data.patch_size": 3, "data.window": 2}

# Keys naming one source, or a list of sources, or a mapping keyed by source.
SOURCE_KEYS = ("data.holdout", "fewshot.source", "selection.val_source")
SOURCE_LIST_KEYS = ("data.sources", "data.train_sources", "data.test_sources")
SOURCE_MAP_KEYS = ("data.policies", "data.image_flips", "data.train_cases", "data.test_cases")

# Groups chosen by `<group>.name`, and the config section holding the arguments of every name.
NAMED_GROUPS = {"model": "networks", "loss": "losses", "method": "methods"}


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool
    text: str

    def __contains__(self, x: float) -> bool:
        if math.isnan(x):
            return False
        above = x >= self.lo if self.lo_closed else x > self.lo
        below = x <= self.hi if self.hi_closed else x < self.hi
        return above and below


_INTERVAL_RE = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


def parse_interval(text: str) -> Interval:
    m = _INTERVAL_RE.match(text)
    if not m:
        raise ValueError(f"range {text!r} is not an interval such as [0, 1) or (0, inf)")
    return Interval(float(m.group(2)), float(m.group(3)), m.group(1) == "[", m.group(4) == "]", text)


_PARSED = {key: parse_interval(text) for key, text in RANGES.items()}


def key_matches(pattern: str, key: str) -> bool:
    """`*` stands for exactly one dotted segment (a name under `networks`, `methods`, ...)."""
    p, k = pattern.split("."), key.split(".")
    return len(p) == len(k) and all(a == "*" or a == b for a, b in zip(p, k))


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-mapping value; lists are values."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, node


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def range_error(key: str, value: Any, interval: Interval) -> str | None:
    """The one-line message for `key=value` outside `interval`, or None when it is inside."""
    items = value if isinstance(value, list) else [value]
    for x in items:
        if not _is_number(x) or x not in interval:
            what = "a number" if not _is_number(x) else "in"
            if isinstance(value, list):
                return f"{key}={value}: every element must be {what} {interval.text}; {x!r} is not"
            return f"{key}={value!r}: must be {what} {interval.text}"
    return None


def check_ranges(values: Mapping) -> None:
    for key, value in leaves(values):
        if value is None:
            continue
        for pattern, interval in _PARSED.items():
            if key_matches(pattern, key):
                message = range_error(key, value, interval)
                if message:
                    raise ValueError(message)
        if key in LENGTHS and (not isinstance(value, list) or len(value) != LENGTHS[key]):
            raise ValueError(f"{key}={value}: needs exactly {LENGTHS[key]} values")


def check_relations(values: Mapping) -> None:
    lo, hi = values["data"]["window"]
    if not lo < hi:
        raise ValueError(f"data.window={[lo, hi]}: the low end must be below the high end (HU)")
    folds = values["fewshot"]["folds"]
    if folds and values["fewshot"]["fold"] >= len(folds):
        raise ValueError(f"fewshot.fold={values['fewshot']['fold']}: fewshot.folds has {len(folds)} folds "
                         f"(0..{len(folds) - 1})")


# selection rules that pick by a validation score (experiments.selection.MONITOR): they need a validation epoch
VALIDATED_RULES = ("training_domain", "loso", "oracle")


def check_schedule(values: Mapping) -> None:
    """Settings that would train for nothing: a rule that picks by validation needs an epoch that validates
    (Lightning validates after epochs k * check_val_every_n_epoch), and `training_domain` needs validation
    patients (data.val_fraction > 0). Found after training, this was a crash with the weights unsaved.
    Called when a run starts (experiments.build.validate_config), before any data is read; not by
    load_config, where each value alone is legal (a config loaded to list or plan it need not train)."""
    t, sel = values["trainer"], values["selection"]
    rules = list(dict.fromkeys(str(r) for r in [sel["method"], *sel["report"]]))
    needs = [r for r in rules if r in VALIDATED_RULES]
    if needs and t["max_epochs"] < t["check_val_every_n_epoch"]:
        raise ValueError(f"trainer.max_epochs={t['max_epochs']} < trainer.check_val_every_n_epoch="
                         f"{t['check_val_every_n_epoch']}: no epoch would validate, and selection {needs} picks by "
                         f"validation; set trainer.check_val_every_n_epoch={t['max_epochs']} (or less), or "
                         "selection.method=last selection.report=[]")
    if str(sel["method"]) == "training_domain" and values["data"]["val_fraction"] == 0:
        raise ValueError("data.val_fraction=0 leaves no validation patients, and selection.method=training_domain "
                         "picks by them; set data.val_fraction>0, or selection.method=last")


def check_choices(values: Mapping) -> None:
    """Lists of choices, whose allowed sets other modules own (imported here, so the two cannot drift apart).
    Single choices are enums in the schema: OmegaConf checked them while merging."""
    from datamodules.harmonize import ABLATABLE_STEPS
    from experiments.choices import SELECTIONS

    d = values["data"]
    unknown = [s for s in values["selection"]["report"] if s not in SELECTIONS]
    if unknown:
        raise ValueError(f"selection.report={list(values['selection']['report'])}: unknown rule(s) {unknown}; "
                         f"allowed: {list(SELECTIONS)}")
    unknown = [s for s in d["harmonize_off"] if s not in ABLATABLE_STEPS]
    if unknown:
        raise ValueError(f"data.harmonize_off={list(d['harmonize_off'])}: unknown step(s) {unknown}; "
                         f"allowed: {list(ABLATABLE_STEPS)}")


def check_registry_args(values: Mapping) -> None:
    """Every entry of networks / losses / methods is a registered name whose arguments are exactly its
    params dataclass's fields, typed (Registry.make_params: errors name `<group>.<name>.<key>`). A method's
    `search` (its sweep space) is not an argument."""
    from lightning_modules.losses import LOSSES
    from lightning_modules.methods import METHODS
    from lightning_modules.networks import NETWORKS

    for registry in (NETWORKS, LOSSES, METHODS):
        for name, args in values[registry.group].items():
            if name not in registry:
                raise ValueError(f"{registry.group}.{name}: no {registry.kind} of that name; registered: "
                                 f"{sorted(registry)} (python -m experiments.list)")
            if not isinstance(args, Mapping):
                raise ValueError(f"{registry.group}.{name}={args!r}: needs a mapping of its arguments")
            registry.make_params(name, {k: v for k, v in args.items() if not (registry is METHODS and k == "search")})


def known_sources(custom_specs: list) -> dict[str, tuple[str, ...]]:
    """Source name -> its label policy names: the registered sources and the custom ones the config lists
    (their YAML read, never registered here: registering is the run's business)."""
    from datamodules.sources import SOURCES
    from datamodules.sources.custom import load_spec

    known = {name: tuple(cls.POLICIES) for name, cls in SOURCES.items()}
    for path in custom_specs:
        known.setdefault(load_spec(path)["name"], ("custom",))
    return known


def check_sources(values: Mapping) -> None:
    """Every source name the config mentions exists: a typo under data.policies or data.image_flips is
    otherwise silently ignored, and a typo in data.sources fails only after the phantom suite is built."""
    from datamodules.alignment import parse_flips

    known = known_sources(list(values["data"]["custom_sources"]))
    hint = f"known sources: {sorted(known)} (private ones join through data.custom_sources)"

    def get(key: str) -> Any:
        node: Any = values
        for part in key.split("."):
            node = node[part]
        return node

    for key in SOURCE_KEYS:
        if get(key) is not None and get(key) not in known:
            raise ValueError(f"{key}={get(key)!r}: unknown source{did_you_mean(get(key), known)}; {hint}")
    for key in SOURCE_LIST_KEYS:
        unknown = [s for s in get(key) if s not in known]
        if unknown:
            raise ValueError(f"{key}={list(get(key))}: unknown source(s) {unknown}"
                             f"{did_you_mean(unknown[0], known)}; {hint}")
    for key in SOURCE_MAP_KEYS:
        for name in get(key):
            if name not in known:
                raise ValueError(f"{key}.{name}: unknown source {name!r}{did_you_mean(name, known)}; {hint}")
    for name, policy in values["data"]["policies"].items():
        if not isinstance(policy, str) or policy not in known[name]:
            raise ValueError(f"data.policies.{name}={policy!r}: {name} has the label policies {list(known[name])}")
    for name, table in values["data"]["image_flips"].items():
        if not isinstance(table, Mapping):
            raise ValueError(f"data.image_flips.{name}={table!r}: needs a mapping {{case-id glob: [axes]}}")
        for pattern, flips in table.items():
            parse_flips(flips, f"data.image_flips.{name}.{pattern}")


def check_config(cfg: DictConfig) -> None:
    """Every check above on the merged config (interpolations resolved; an unresolvable one is named)."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except InterpolationValidationError as e:  # resolved, to a value the key's type refuses
        raise ValueError(f"{e.full_key}: {_first_line(e)}") from None
    except InterpolationResolutionError as e:
        raise ValueError(f"{e.full_key}: cannot resolve {_first_line(e)}") from None
    check_ranges(values)
    check_relations(values)
    check_choices(values)
    check_registry_args(values)
    check_sources(values)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def split_override(item: str) -> tuple[str, str]:
    """`key=value` -> (key, value); the key must be a dotted path of non-empty names."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value (e.g. data.batch_size=4)")
    key, value = item.split("=", 1)
    if not key or any(not part.strip() for part in key.split(".")):
        raise ValueError(f"override {item!r}: key {key!r} is not a dotted path such as data.batch_size")
    return key, value


def unknown_key_message(cfg: DictConfig, key: str) -> str:
    """Names the first segment of `key` that does not exist and the keys that do exist there."""
    parts = key.split(".")
    node, depth = cfg, 0
    while depth < len(parts) - 1 and isinstance(node, DictConfig) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    unknown, parent = ".".join(parts[:depth + 1]), ".".join(parts[:depth])
    where = f" (in {key})" if unknown != key else ""
    present = sorted(node) if isinstance(node, DictConfig) else []
    close = closest(parts[depth], present)
    # the dotted key the user meant comes first: the list of keys can be long
    close = f"; did you mean {'.'.join([*parts[:depth], close])}?" if close else ""
    return f"unknown key {unknown}{where}{close}; keys under {parent or 'the top level'}: {present}"


def choice_type(cfg: DictConfig, key: str) -> type[enum.Enum] | None:
    """The enum the schema types the dotted `key` with, or None (not a choice, or no such key). Read from
    the node, never the value: the value may be an interpolation that does not resolve."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return None
        node = node._get_node(part, throw_on_missing_key=False)
        if node is None:
            return None
    return getattr(node, "enum_type", None)  # omegaconf.nodes.EnumNode


def choice_message(key: str, value: Any, choices: type[enum.Enum]) -> str:
    return f"{key}={value!r}: must be one of {[m.value for m in choices]}"


def merge_error(cfg: DictConfig, e: OmegaConfBaseException) -> str:
    """One line for a value OmegaConf refused while merging a YAML file into `cfg`, naming the key."""
    key = str(e.full_key or e.key or "")
    choices = choice_type(cfg, key) if isinstance(e, ValidationError) and key else None
    if choices:
        return choice_message(key, getattr(e, "value", None), choices)
    if isinstance(e, ConfigKeyError) and key:
        return unknown_key_message(cfg, key)
    return f"{key}: {_first_line(e)}" if key else _first_line(e)


def override_error(cfg: DictConfig, item: str, key: str, value: str, e: Exception) -> ValueError:
    """A one-line message for an override OmegaConf refused, naming the key."""
    choices = choice_type(cfg, key) if isinstance(e, ValidationError) else None
    if choices:
        return ValueError(f"override {item!r}: {choice_message(key, value, choices)}")
    target = OmegaConf.select(cfg, key, default=None, throw_on_missing=False) if "." in key or key in cfg else None
    if isinstance(e, ConfigKeyError):
        return ValueError(f"override {item!r}: {unknown_key_message(cfg, key)}")
    if isinstance(target, ListConfig) and not value.lstrip().startswith("["):
        n = LENGTHS.get(key)
        example = ",".join([value] * n) if n else value
        count = f"{n} values, " if n else ""
        return ValueError(f"override {item!r}: {key} is a list; write {key}=[{example}] ({count}comma-separated in "
                          "brackets)")
    if isinstance(target, DictConfig):
        if "name" in target and key in NAMED_GROUPS:  # `method=mixstyle` for `method.name=mixstyle`
            names = sorted(cfg[NAMED_GROUPS[key]])
            meant = closest(value, names) or value
            return ValueError(f"override {item!r}: {key} is a group of settings; did you mean {key}.name={meant}? "
                              f"({NAMED_GROUPS[key]} configured: {names})")
        present = f": {sorted(target)}" if len(target) else ""
        return ValueError(f"override {item!r}: {key} is a group of settings, not one value; set its keys "
                          f"({key}.<name>=...){present}")
    return ValueError(f"override {item!r}: {key}: {_first_line(e)}")


def apply_overrides(cfg: DictConfig, items: list[str]) -> DictConfig:
    """Merge command-line overrides one at a time, each error naming its item and key."""
    for item in items:
        key, value = split_override(item)
        try:
            patch = OmegaConf.from_dotlist([item])
        except Exception as e:  # YAML's parser: an unclosed bracket or quote, a stray colon
            raise ValueError(f"override {item!r}: the value of {key} is not valid YAML "
                             f"({' '.join(str(e).split())[:200]})") from None
        try:
            merged = OmegaConf.merge(cfg, patch)
            if "${" in value:  # an interpolation resolves now, while its override can still be named
                OmegaConf.select(merged, key, throw_on_missing=False)
        except OmegaConfBaseException as e:
            raise override_error(cfg, item, key, value, e) from None
        cfg = merged
    return cfg
