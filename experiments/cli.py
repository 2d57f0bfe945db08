"""`covid-dg`: one console script for every entry point (setup.cfg `[options.entry_points]`).

    covid-dg COMMAND [ARGS...]       # the same as python -m MODULE [ARGS...]
    covid-dg COMMAND --help          # that command's own help
    covid-dg --help                  # the commands, one line each

Installed with the package (`pip install -e .`), it works without activating the virtual environment
(`.venv/bin/covid-dg`), where a bare `python -m experiments.loso` needs the environment's python. Each
command runs its module as `python -m` would (runpy, `__name__ == "__main__"`), so the two forms take
the same arguments, print the same and exit with the same status. `--debug` anywhere shows tracebacks
(rundir.cli). A command whose module is not part of this installation (e.g. `bench`, which lives in the
checkout's benchmarks/) says so in one line.
"""
from __future__ import annotations

import importlib.util
import runpy
import sys
import warnings

import rundir.cli
from rundir.cli import did_you_mean, split_debug

PROG = "covid-dg"

# command -> (module run as __main__, one line of help). Dispatched by module name: a module that is added
# later (experiments.select) works as soon as it exists.
COMMANDS: dict[str, tuple[str, str]] = {
    "loso": ("experiments.loso", "leave-one-source-out run: train on all sources but --holdout, test on it"),
    "transfer": ("experiments.transfer", "train on --train sources, test on --test sources (transfer matrix cells)"),
    "fewshot": ("experiments.fewshot", "few-shot folds: a few cases of one source train, its others test"),
    "train": ("experiments.train", "train exactly the split a plan.json lists (--plan FILE)"),
    "test": ("experiments.test_run", "test a finished run's checkpoint again"),
    "predict": ("experiments.predict", "segment new scans with a run's checkpoint"),
    "score": ("experiments.score", "score a run's predictions/ against the references (per_case.csv, metrics.json)"),
    "evaluate": ("experiments.evaluate", "score any folder of predictions against a data root"),
    "verify": ("datamodules.verify", "check a data root before training: layouts, cases, every bad file"),
    "audit": ("datamodules.audit", "audit the harmonized data: what the harmonizer did to each source"),
    "report": ("experiments.report", "tables, plots and summary.md from finished run folders"),
    "select": ("experiments.select", "apply selection rules to finished runs after the fact (records.jsonl)"),
    "sweep": ("sweeps.launch", "launch a sweep (LOSO, transfer, methods, ...) locally or on SLURM"),
    "list": ("experiments.list", "list what exists: sources, networks, losses, methods, presets"),
    "bench": ("benchmarks.run", "micro-benchmarks (from a checkout: benchmarks/ is not installed)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} [--debug] COMMAND [ARGS...]", "",
             "Domain generalization for COVID-19 chest-CT lesion segmentation. Each command is also",
             "`python -m MODULE`; `covid-dg COMMAND --help` shows its arguments.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help  this list",
              "  --debug     show the traceback of an error instead of its one line"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, debug = split_debug(argv)
    if not rest or rest[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if rest else 2
    command, args = rest[0], rest[1:]
    if command not in COMMANDS:
        print(f"{PROG}: error: unknown command {command!r}{did_you_mean(command, COMMANDS)}; commands: "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = COMMANDS[command][0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its package is missing
        found = False
    if not found:
        print(f"{PROG}: error: command {command!r} needs the module {module}, which is not part of this "
              f"installation" + (" (run it from a checkout of covid-dg)" if command == "bench" else ""),
              file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [f"{PROG} {command}", *args, *(["--debug"] if debug else [])]
    rundir.cli.dispatched_as = f"{PROG} {command}"
    try:
        with warnings.catch_warnings():
            # runpy's note that the module was imported before (a test, or `covid-dg` run in-process)
            warnings.filterwarnings("ignore", message=".*found in sys.modules.*", category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)  # sys.exit("message") prints its message and exits 1
        return 1
    finally:
        sys.argv = saved
        rundir.cli.dispatched_as = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
