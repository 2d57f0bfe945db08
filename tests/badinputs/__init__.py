"""The standing bad-input corpus: inputs a careful user might hand the framework, each with what must
happen. `tests/test_bad_inputs.py` runs every case; `python -m tests.badinputs` counts them per kind
(the README's "Reliability" section quotes those counts).

A case is a function `run(tmp: Path)` registered with `@bad_input(kind, match=..., names=...)`:
- it writes its input under `tmp` with code independent of the checks it probes, then calls the
  product the way a user would (function, CLI through `cli()`);
- `match` is a regex the raised error's message must contain (`re.search`), and every string in
  `names` (a file name or config key, formatted with `tmp=`) must appear literally in it;
- `ACCEPTED` as `match` means the input is valid and must go through: `run` asserts what came out.
Modules in this package (volumes, config, cache, faults, ...) register their cases on import.
"""
from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ACCEPTED = "<accepted>"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BadInput:
    name: str
    kind: str
    run: Callable[[Path], object]
    match: str
    names: tuple[str, ...] = field(default=())
    error: type[BaseException] = Exception


CASES: dict[str, BadInput] = {}


def bad_input(kind: str, match: str, names: tuple[str, ...] = (), error: type[BaseException] = Exception):
    def register(fn):
        name = f"{kind}:{fn.__name__.removeprefix('case_')}"
        if name in CASES:
            raise ValueError(f"bad-input case {name} registered twice")
        CASES[name] = BadInput(name, kind, fn, match, tuple(names), error)
        return fn
    return register


class CliError(RuntimeError):
    """A command exited non-zero: message = 'exit N: <stderr+stdout tail>'."""

    def __init__(self, code: int, text: str):
        super().__init__(f"exit {code}: {text}")
        self.code = code


def cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> str:
    """Run `python -m <args>` as a user would; return stdout, raise CliError on a non-zero exit."""
    import os

    proc = subprocess.run([sys.executable, "-m", *args], cwd=str(cwd or REPO), capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})
    if proc.returncode != 0:
        raise CliError(proc.returncode, (proc.stderr + proc.stdout)[-4000:])
    return proc.stdout


def load_all() -> dict[str, BadInput]:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name == "__main__":
            continue
        importlib.import_module(f"{__name__}.{mod.name}")
    return CASES
