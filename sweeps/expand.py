"""W&B sweep files -> concrete runs, without W&B: the local and SLURM backends expand the grid here.

A sweep file is W&B sweep YAML (`method: grid`, `parameters: {key: {value: v} | {values: [...]}}`) plus
two placeholders resolved against the preset's `data.sources`: `$sources` (each source name) and
`$[sources]` (each as a one-element list, for list-valued keys such as data.train_sources). Our own
`covid_dg:` block is removed before the file is handed to W&B.

A hyperparameter search (`covid_dg: {hparams: {n_hparams, n_trials, seed}}`, sweeps/hparams.yaml) multiplies
every grid point by `n_hparams` configurations of its method, drawn from the method's `search` space in
the config (`methods.<name>.search`, W&B sweep syntax), times `n_trials` seeds (`run.seed`). Configuration 0
is the method's default (as DomainBed's hparams_seed 0); the others are seeded random draws, distinct from
the default and from each other (a small space gives fewer).
"""
from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
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
    hparams_block(spec, path)
    spec.setdefault("name", path.stem)
    spec["_path"] = str(path)
    return spec


HPARAMS_KEYS = {"n_hparams": 1, "n_trials": 1, "seed": 0}  # key -> smallest value


def hparams_block(spec: dict, where: str | Path = "sweep") -> dict | None:
    """The sweep's `covid_dg.hparams` block, checked (None for a plain grid)."""
    block = (spec.get("covid_dg") or {}).get("hparams")
    if block is None:
        return None
    if not isinstance(block, dict) or set(block) - set(HPARAMS_KEYS):
        raise SweepError(f"{where}: covid_dg.hparams takes {sorted(HPARAMS_KEYS)}, got {block!r}")
    for key, low in HPARAMS_KEYS.items():
        v = block.get(key, low)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise SweepError(f"{where}: covid_dg.hparams.{key} must be an integer >= {low}, got {v!r}")
    if "run.seed" in spec.get("parameters", {}):
        raise SweepError(f"{where}: a hyperparameter search sets run.seed from covid_dg.hparams.n_trials; "
                         "remove the run.seed parameter")
    return {k: block.get(k, low) for k, low in HPARAMS_KEYS.items()}


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


DISTRIBUTIONS = ("uniform", "int_uniform", "log_uniform_values")


def _draw_one(name: str, p: Mapping, rng: np.random.Generator):
    """One value of a W&B sweep parameter: `value`, `values` (uniform choice) or `min`/`max` with
    `distribution` uniform (default for floats), int_uniform (default for integers) or log_uniform_values."""
    if not isinstance(p, Mapping):
        raise SweepError(f"{name}: a search parameter is a mapping (value / values / min, max), got {p!r}")
    if "value" in p:
        return p["value"]
    if "values" in p:
        vals = list(p["values"])
        if not vals:
            raise SweepError(f"{name}: empty values")
        return vals[int(rng.integers(len(vals)))]
    if "min" in p and "max" in p:
        lo, hi = p["min"], p["max"]
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi))
        dist = p.get("distribution", "int_uniform" if ints else "uniform")
        if dist not in DISTRIBUTIONS or not lo <= hi or (dist == "log_uniform_values" and lo <= 0):
            raise SweepError(f"{name}: min {lo!r} <= max {hi!r} with distribution one of {DISTRIBUTIONS} "
                             "(log_uniform_values: min > 0)")
        if dist == "int_uniform":
            return int(rng.integers(int(lo), int(hi) + 1))
        if dist == "log_uniform_values":
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return float(rng.uniform(lo, hi))
    raise SweepError(f"{name}: needs value, values, or min and max (W&B sweep syntax)")


def draw_hparams(search: Mapping | None, n_hparams: int, seed: int = 0, where: str = "search",
                 defaults: Mapping | None = None) -> list[dict]:
    """Up to `n_hparams` configurations of one method: `{}` (its defaults) first, then seeded random draws
    from `search` (arg -> W&B parameter), each distinct from those before and from `defaults` (the method's
    own arguments: a draw that reproduces them would rerun configuration 0); a space too small for
    `n_hparams` distinct draws gives fewer (a method without a search space: its default alone). The draws
    depend on (`where`, `seed`) only: adding a method or a configuration never changes another's."""
    out: list[dict] = [{}]
    if not search:
        return out
    rng = np.random.default_rng([zlib.crc32(where.encode()), seed])
    seen: list[dict] = []
    missing = object()
    for _ in range(100 * n_hparams):
        if len(out) >= n_hparams:
            break
        draw = {k: _draw_one(f"{where}.{k}", p, rng) for k, p in search.items()}
        if defaults is not None and all((defaults or {}).get(k, missing) == v for k, v in draw.items()):
            continue
        if draw not in seen:
            seen.append(draw)
            out.append(draw)
    return out


def expand_hparams(spec: dict, sources: Sequence[str], searches: Mapping[str, Mapping | None],
                   default_method: str, defaults: Mapping[str, Mapping] | None = None) -> list[tuple[list[str], dict]]:
    """Every run of a hyperparameter search: the grid's overrides, then the configuration's
    `methods.<method>.<arg>=value` overrides, then `run.seed=<trial>`; each with
    `{"id", "method", "values", "trial"}` (values: what configuration `id` changes; {} for the default).
    `searches`: method -> its search space (`methods.<name>.search` of the config); `defaults`: method -> its
    arguments (draws equal to them are skipped)."""
    block = hparams_block(spec, spec.get("_path", "sweep"))
    if block is None:
        raise SweepError("not a hyperparameter search (no covid_dg.hparams block)")
    out = []
    for overrides in expand(spec, sources):
        method = next((o.split("=", 1)[1] for o in overrides if o.startswith("method.name=")), default_method)
        if method not in searches:
            raise SweepError(f"method.name={method}: no such entry of `methods` in the config")
        for h, values in enumerate(draw_hparams(searches[method], block["n_hparams"], block["seed"],
                                                f"methods.{method}.search", (defaults or {}).get(method, {}))):
            extra = [f"methods.{method}.{k}={_format(v)}" for k, v in values.items()]
            for t in range(block["n_trials"]):
                out.append(([*overrides, *extra, f"run.seed={t}"],
                            {"id": h, "method": method, "values": values, "trial": t}))
    return out


def wandb_runs_spec(spec: dict, runs: Sequence[Sequence[str]], fixed: Sequence[str]) -> dict:
    """A W&B grid over listed runs (a hyperparameter search is no product of values): one parameter,
    `sweep.overrides`, whose values are each run's own overrides joined by spaces; experiments.sweep_run
    splits it back, so a run reaches the same folder under every backend. Fixed overrides as above."""
    out = {k: v for k, v in spec.items() if not k.startswith("_") and k != "covid_dg"}
    params = {}
    for item in fixed:
        key, value = item.split("=", 1)
        params[key] = {"value": value}
    own = [" ".join(o for o in r if o not in fixed) for r in runs]
    params[RUN_OVERRIDES] = {"values": own}
    out["parameters"] = params
    return out


RUN_OVERRIDES = "sweep.overrides"


def split_run_overrides(argv: Sequence[str]) -> list[str]:
    """argv with a `sweep.overrides=a=1 b=2` argument (wandb_runs_spec) replaced by its overrides."""
    out = []
    for a in argv:
        if a.startswith(RUN_OVERRIDES + "="):
            out += a.split("=", 1)[1].split()
        else:
            out.append(a)
    return out
