"""W&B sweep files -> concrete runs, without W&B: the local and SLURM backends expand the grid here.

A sweep file is W&B sweep YAML (`method: grid`, `parameters: {key: {value: v} | {values: [...]}}`) plus
two placeholders resolved against the preset's `data.sources`: `$sources` (each source name) and
`$[sources]` (each as a one-element list, for list-valued keys such as data.train_sources). Our own
`covid_dg:` block is removed before the file is handed to W&B.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import yaml

from rundir.naming import run_hash

SWEEP_DIR = Path(__file__).resolve().parent
PLACEHOLDERS = ("$sources", "$[sources]")


class SweepError(ValueError):
    pass


def sweep_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = SWEEP_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
        raise SweepError(f"no sweep {name!r}: give a YAML file or one of {known}")
    return path


def load_sweep(name: str) -> dict:
    path = sweep_path(name)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({e})") from None
    if spec.get("method", "grid") != "grid":
        raise SweepError(f"{path}: method {spec.get('method')!r}; the local and SLURM backends expand grids only "
                         "(BACKEND=wandb runs any method)")
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path}: no parameters")
    for key, p in params.items():
        if not isinstance(p, dict) or ("value" in p) == ("values" in p):
            raise SweepError(f"{path}: parameter {key!r} needs exactly one of value / values (grid sweeps)")
    spec.setdefault("name", path.stem)
    spec["_path"] = str(path)
    return spec


def _format(value) -> str:
    """A YAML value as an OmegaConf dotlist value."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format(v) for v in value) + "]"
    return str(value)


def _values(key: str, p: dict, sources: Sequence[str]) -> list[str]:
    raw = [p["value"]] if "value" in p else list(p["values"])
    out = []
    for v in raw:
        if v == "$sources":
            out += list(sources)
        elif v == "$[sources]":
            out += [f"[{s}]" for s in sources]
        else:
            out.append(_format(v))
    if not out:
        raise SweepError(f"parameter {key!r} has no value (empty data.sources?)")
    return out


def resolve(spec: dict, sources: Sequence[str]) -> dict:
    """The sweep with placeholders replaced: every parameter a list of dotlist strings."""
    return {key: _values(key, p, sources) for key, p in spec["parameters"].items()}


def expand(spec: dict, sources: Sequence[str]) -> list[list[str]]:
    """Every run of the grid as `key=value` overrides, in the file's parameter order."""
    params = resolve(spec, sources)
    keys = list(params)
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*params.values())]


def overrides_hash(overrides: Sequence[str]) -> str:
    """The hash in a sweep run's folder name: rundir.naming.run_hash of its overrides (the keys that do not
    change the computation left out, order ignored)."""
    return run_hash(list(overrides))


def wandb_spec(spec: dict, sources: Sequence[str], fixed: Sequence[str]) -> dict:
    """A concrete W&B sweep config: placeholders resolved, our block removed, fixed overrides (preset,
    runs folder) as single-value parameters so every agent's run gets them."""
    out = {k: v for k, v in spec.items() if not k.startswith("_") and k != "covid_dg"}
    params = {k: ({"values": vs} if len(vs) > 1 else {"value": vs[0]}) for k, vs in resolve(spec, sources).items()}
    for item in fixed:
        key, value = item.split("=", 1)
        params[key] = {"value": value}
    out["parameters"] = params
    return out
