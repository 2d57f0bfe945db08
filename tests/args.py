"""A registered network's, loss's or method's arguments as the config holds them (base.yaml), for tests
that build one directly: the values live in the config only (each params dataclass has no numbers), so a
test states just the arguments it changes."""
from __future__ import annotations

from functools import cache

from omegaconf import OmegaConf

from experiments.config import CONFIG_DIR


@cache
def _base() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "base.yaml"))


def base_args(group: str, name: str, **changes) -> dict:
    """`<group>.<name>` of base.yaml (a method's sweep `search` left out), updated with `changes`."""
    args = {k: v for k, v in _base()[group][name].items() if k != "search"}
    unknown = set(changes) - set(args)
    assert not unknown or group == "networks", f"{group}.{name} has no {sorted(unknown)}"  # optional network args
    return {**args, **changes}
