"""Choice-valued settings as enums: the config schema (experiments/config.py) types its keys with them, so
OmegaConf refuses any other value when the config loads, and the modules acting on a value import its
allowed set from here (NORMALIZE, ON_ERROR, SAMPLING, WHERE), so the two cannot drift apart.

A `Choice` member stands in for its string past the config: it compares and hashes equal to it, prints,
formats and reprs as it, and dumps to JSON and YAML as it. Member names equal values (OmegaConf writes
the name). It is still its own class, though: pickled it stays an enum member, and W&B types table cells by
their exact class. So values leaving the config for a checkpoint (loaded with `weights_only=True`, which
refuses unknown classes), W&B or a library are made plain (`OmegaConf.to_container(..., enum_to_str=True)`,
`str(member)`), as runner, selection, harmonize and datamodule do.
"""
from __future__ import annotations

import enum

import yaml


class Choice(str, enum.Enum):
    """A str-valued enum whose members stand in for their strings."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def _represent(dumper: yaml.SafeDumper, member: Choice):
    return dumper.represent_str(member.value)


for _dumper in (yaml.SafeDumper, yaml.Dumper):
    yaml.add_multi_representer(Choice, _represent, Dumper=_dumper)


class Normalize(Choice):
    """data.normalize: minmax: window -> [0, 1]; zscore: (clip(hu) - mean) / std; none: HU as they are."""
    minmax = "minmax"
    zscore = "zscore"
    none = "none"


class OnError(Choice):
    """data.on_error: what a bad case file does: stop the run, or leave the case out and record it."""
    fail = "fail"
    skip = "skip"


class Sampling(Choice):
    """data.sampling: a training patch's case drawn uniformly, or a source first (every source equally often)."""
    uniform = "uniform"
    source_balanced = "source_balanced"


class AugmentWhere(Choice):
    """augment.where: no augmentation, in the loader workers (CPU), or after the transfer (the GPU when there is one)."""
    none = "none"
    loader = "loader"
    device = "device"


NORMALIZE = Normalize.values()
ON_ERROR = OnError.values()
SAMPLING = Sampling.values()
WHERE = AugmentWhere.values()
