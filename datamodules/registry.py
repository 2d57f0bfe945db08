"""Name -> builder registries filled by decorators (sources, networks, losses, DG methods, protocols).

An entry may register a params dataclass: the entry's arguments, typed, each without a default where
the config holds the value (experiments/configs/base.yaml, `networks.<name>` etc.; a test checks that
base.yaml has exactly those fields), so every default lives in one place. A field defaulting to None
means "the library's own default, or derived" and is left out of base.yaml. `make_params` checks
arguments against the dataclass: an unknown, missing or mistyped one is one line naming
`<group>.<name>.<key>`, the key the user would fix.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class Registry(dict):
    """A dict that is filled only through `register` and answers unknown names with the known ones."""

    def __init__(self, kind: str, group: str | None = None):
        super().__init__()
        self.kind = kind
        self.group = group or f"{kind}s"  # the config block holding the entries' arguments
        self.params: dict[str, type] = {}  # name -> params dataclass, for entries that registered one

    def register(self, name: str, params: type | None = None) -> Callable[[T], T]:
        if params is not None and not dataclasses.is_dataclass(params):
            raise TypeError(f"{self.kind} {name!r}: params must be a dataclass, got {params!r}")

        def wrap(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self[name] = obj
            if params is not None:
                self.params[name] = params
            return obj

        return wrap

    def lookup(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self)}") from None

    def make_params(self, name: str, args: Mapping[str, Any]):
        """`args` checked against entry `name`'s params dataclass, as an instance of it (values as given)."""
        self.lookup(name)
        cls = self.params[name]
        where = f"{self.group}.{name}"
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: {self.kind} {name!r} has no argument {unknown[0]!r}; "
                             f"its arguments: {known}")
        missing = [k for k in required_fields(cls) if k not in args]
        if missing:
            raise ValueError(f"{where}: missing argument(s) {missing} of {self.kind} {name!r} "
                             f"(experiments/configs/base.yaml holds every one)")
        check_types(cls, args, where)
        return cls(**args)


def required_fields(cls: type) -> list[str]:
    """The fields of a params dataclass that have no default: the ones base.yaml must hold."""
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def check_types(cls: type, args: Mapping[str, Any], where: str) -> None:
    """OmegaConf's type check (and conversion rules: 1 is a float, "1" an int) of `args` against the
    dataclass's annotations; `Any` fields are not checked. Raises ValueError naming `<where>.<key>`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    types = field_types(cls)
    for key, value in args.items():  # OmegaConf's own words for this case name its internals
        if types[key].startswith("list[") and value is not None and not isinstance(value, list | tuple):
            raise ValueError(f"{where}.{key}={value!r}: needs a list ({types[key]}), e.g. [{value}]")
    try:
        OmegaConf.merge(OmegaConf.structured(cls), {k: _plain(v) for k, v in args.items()})
    except OmegaConfBaseException as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        top = str(e.full_key or e.key or "").split(".")[0].split("[")[0]  # the argument, not a list index
        if top not in args:
            raise ValueError(f"{where}: {line}") from None
        raise ValueError(f"{where}.{top}={args[top]!r}: {line} (it takes {field_types(cls)[top]})") from None


def _plain(value: Any) -> Any:
    """Tuples as lists (OmegaConf's containers take lists)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def field_types(cls: type) -> dict[str, str]:
    """Field name -> its type as written (for messages and `python -m experiments.list`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _type_name(hints[f.name]) for f in dataclasses.fields(cls)}


def _type_name(t: Any) -> str:
    if t is Any:
        return "any"
    if isinstance(t, type) and not typing.get_args(t):
        return t.__name__
    return str(t).replace("typing.", "")
