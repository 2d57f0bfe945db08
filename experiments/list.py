"""Everything an experiment can select, read from the registries: `python -m experiments.list [--json]`.

Sources (`data.sources`), networks (`model.name`), losses (`loss.name`), DG methods (`method.name`),
augmentations (`augment.ops`), scale and protocol presets (`experiment=`, `preset=`) and sweeps
(`make sweep SWEEP=`), each with a one-line description: the first line of its docstring or YAML comment.
With --json, a network's, loss's or method's `arguments` (its params dataclass: name -> type; the values
are `networks.<name>` etc. in the config) and `choices` (every choice-valued key and its allowed values).
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from experiments.config import CONFIG_DIR
from rundir.cli import command_name, run_cli


def _first_line(obj) -> str:
    """First docstring line of the object itself (not one inherited from a base class), else its module's."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not (doc or "").strip():
        doc = sys.modules[obj.__module__].__doc__ or ""
    return inspect.cleandoc(doc).splitlines()[0].strip() if doc.strip() else ""


def _yaml_comment(path: Path) -> str:
    """The first sentence of a YAML file's leading comment (presets and sweeps describe themselves there)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = text.find(". ")
    return text[: end + 1] if end >= 0 else text


def arguments(registry, name: str) -> dict[str, str]:
    """Argument -> type of a registry entry's params dataclass; an optional one (None: the library's
    default) is marked as such."""
    from datamodules.registry import field_types, required_fields

    required = set(required_fields(registry.params[name]))
    return {k: t if k in required else f"{t} (optional)" for k, t in field_types(registry.params[name]).items()}


def choices() -> dict[str, list[str]]:
    """Dotted key -> allowed values of every enum-typed key of the config schema."""
    import dataclasses
    import enum
    import typing

    from experiments.config import Config

    out: dict[str, list[str]] = {}

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            t = typing.get_type_hints(cls)[f.name]
            if isinstance(t, type) and issubclass(t, enum.Enum):
                out[prefix + f.name] = [m.value for m in t]
            elif dataclasses.is_dataclass(t):
                walk(t, f"{prefix}{f.name}.")

    walk(Config, "")
    return out


def catalogue() -> dict[str, list[dict]]:
    """{kind: [{name, description, ...}]} for every registry and preset folder, sorted by name."""
    from datamodules.augment import AUGMENTS
    from datamodules.sources import SOURCES
    from lightning_modules.losses import LOSSES
    from lightning_modules.methods import METHODS
    from lightning_modules.networks import NETWORKS
    from sweeps.expand import SWEEP_DIR

    out = {
        "sources": [{"name": n, "description": _first_line(SOURCES[n]),
                     "policies": sorted(getattr(SOURCES[n], "POLICIES", {}))} for n in sorted(SOURCES)],
        "networks": [{"name": n, "description": _first_line(NETWORKS[n]),
                      "spatial_dims": list(getattr(NETWORKS[n], "dims", (2, 3))), "arguments": arguments(NETWORKS, n)}
                     for n in sorted(NETWORKS)],
        "losses": [{"name": n, "description": _first_line(LOSSES[n]),
                    "needs_frequencies": bool(getattr(LOSSES[n], "needs_frequencies", False)),
                    "arguments": arguments(LOSSES, n)} for n in sorted(LOSSES)],
        "methods": [{"name": n, "description": _first_line(METHODS[n]), "test_time": METHODS[n].test_time,
                     "arguments": arguments(METHODS, n)} for n in sorted(METHODS)],
        "augmentations": [{"name": n, "description": _first_line(AUGMENTS[n])} for n in sorted(AUGMENTS)],
        "experiments": [{"name": p.stem, "description": _yaml_comment(p)}
                        for p in sorted((CONFIG_DIR / "experiment").glob("*.yaml"))],
        "presets": [{"name": p.stem, "description": _yaml_comment(p)}
                    for p in sorted((CONFIG_DIR / "preset").glob("*.yaml"))],
        "sweeps": [{"name": p.stem, "description": _yaml_comment(p)} for p in sorted(SWEEP_DIR.glob("*.yaml"))],
    }
    return out


def render(cat: dict[str, list[dict]]) -> str:
    lines = []
    for kind, entries in cat.items():
        lines.append(f"{kind}:")
        width = max((len(e["name"]) for e in entries), default=0)
        for e in entries:
            extra = ""
            if kind == "networks":
                extra = f" [{'/'.join(f'{d}D' for d in e['spatial_dims'])}]"
            elif kind == "methods" and e["test_time"]:
                extra = " [test time]"
            lines.append(f"  {e['name']:<{width}}  {e['description']}{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=command_name("python -m experiments.list"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="machine-readable: {kind: [{name, description, ...}]}, "
                        "with each entry's arguments and, under `choices`, every choice-valued key's values")
    args = parser.parse_args(argv)
    cat = catalogue()
    print(json.dumps({**cat, "choices": choices()}, indent=1) if args.json else render(cat))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.list"))
