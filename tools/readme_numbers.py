"""`make readme-numbers`: rerun the documented commands and rewrite the numbers tables of README.md and docs/.

Each measured table in the README and in docs/ sits between marker lines

    <!-- numbers:NAME -->
    | ... the table ... |
    <!-- /numbers:NAME -->

and NAME is one job below. A job runs its command into a scratch runs folder (the phantom suite and the
harmonized cache under `paths.cache` are reused, as when the numbers were first measured), reads the run's
`metrics.json` or the sweep's headline table, and the block is replaced by the new table and a stamp
line: the date, the wall time, the machine's cores and load, and the library versions (Python, torch,
MONAI, pytorch-lightning, NumPy). Prose around the blocks is not touched: numbers quoted in prose keep
the date they state.

    python -m tools.readme_numbers [--only demo,smoke] [--dry-run] [--runs DIR] [--reuse DIR]

`--dry-run` prints the commands and the blocks they would rewrite, and runs nothing. `--reuse DIR` reads
the results of an earlier run of the same commands under DIR instead of running them (wall time unknown,
or given with `--wall SECONDS` for one job).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOSO_HEADER = ("| command | wall time | held-out `test/mosmed/dice` | `test/mosmed/nsd` (3 mm) | `test/mosmed/hd95` "
               "| `val/mean/dice` (training sources) |\n|---|---|---|---|---|---|\n")


@dataclass(frozen=True)
class Job:
    name: str
    shown: str                       # the command as the docs show it
    argv: Callable[[Path], list[str]]  # the command run, given the scratch runs folder
    table: Callable[[Path, float | None], str]  # the block's table, given the runs folder and the wall time
    about: str
    extra: tuple[tuple[str, Callable[[Path], str]], ...] = ()  # further blocks (name, render) from the same runs
    then: tuple[Callable[[Path], list[str]], ...] = ()  # commands run after argv (wall time: all of them)


def _fmt_s(wall: float | None) -> str:
    return "n/a" if wall is None else f"{wall:.0f} s"


def _single_run(runs: Path, kind: str, prefix: str) -> Path:
    found = sorted(p for p in (runs / kind).glob(f"{prefix}-*") if (p / "done").exists())
    if len(found) != 1:
        raise RuntimeError(f"expected one finished run {runs / kind / prefix}-*, found {len(found)}: {found}")
    return found[0]


def loso_row(shown: str, experiment: str, holdout: str = "mosmed") -> Callable[[Path, float | None], str]:
    def table(runs: Path, wall: float | None) -> str:
        run = _single_run(runs, "loso", f"{holdout}-{experiment}")
        m = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        if m.get("data") != "phantom":
            raise RuntimeError(f"{run}: not phantom data ({m.get('data')!r}); the documented numbers are phantom")
        t = f"test/{holdout}"
        return LOSO_HEADER + (f"| `{shown}` | {_fmt_s(wall)} | {m[t + '/dice']:.3f} | {m[t + '/nsd']:.3f} "
                              f"| {m[t + '/hd95']:.0f} mm | {m['val/mean/dice']:.3f} |\n")
    return table


def loso_printout(experiment: str, holdout: str = "mosmed") -> Callable[[Path], str]:
    """The end of what the run prints: its folder and the held-out metrics (as in the README)."""
    def render(runs: Path) -> str:
        run = _single_run(runs, "loso", f"{holdout}-{experiment}")
        m = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        shown = Path("runs") / "loso" / run.name
        keys = [f"test/{holdout}/dice", f"test/{holdout}/hd95", f"test/{holdout}/nsd", "val/mean/dice"]
        body = "\n".join(f"  {k} = {m[k]:.4f}" for k in keys)
        return f"```\nrun folder: {shown}\n{body}\n  ...\n  (phantom data: synthetic sources)\n```\n"
    return render


def sweep_table(sweep: str, headline: str, preset: str = "smoke") -> Callable[[Path, float | None], str]:
    def table(runs: Path, wall: float | None) -> str:
        path = runs / f"{sweep}-{preset}" / f"{headline}.md"
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = []
        for line in lines:
            if line.startswith("|"):
                rows.append(line)
            elif rows:
                break
        if not rows:
            raise RuntimeError(f"{path}: no table")
        return "\n".join(rows) + "\n"
    return table


def _csv_rows(path: Path, holdout: str | None = None) -> dict[str, dict[str, str]]:
    """method -> row of one of select's CSVs; with `holdout`, only that held-out source's rows (a paired CSV
    holds one row per method and held-out source, plus a pooled `mean` row)."""
    import csv

    with path.open(encoding="utf-8", newline="") as f:
        return {r["method"]: r for r in csv.DictReader(f) if holdout is None or r["holdout"] == holdout}


def _mean_se(row: dict[str, str] | None, holdout: str) -> str:
    if row is None or not row.get(holdout):
        return "n/a"
    se = float(row.get(f"{holdout}_se") or "nan")
    return f"{float(row[holdout]):.3f}" + ("" if se != se else f" ± {se:.3f}")  # se != se: NaN, one trial


def _signed(x: str) -> str:
    return f"{float(x):+.3f}".replace("-", "\u2212")  # the typographic minus, as the hand-written tables


def selection_table(sweep: str, preset: str, holdout: str = "mosmed") -> Callable[[Path, float | None], str]:
    """One row per method from `experiments.select`'s CSVs: held-out Dice (mean ± SE over trials) under the
    headline rule, its paired difference from erm, and the `last` and `oracle` rules beside it."""
    def table(runs: Path, wall: float | None) -> str:
        sel = runs / f"{sweep}-{preset}" / "selection"
        rules = {r: _csv_rows(sel / f"table_{r}.csv") for r in ("training_domain", "last", "oracle")}
        paired = _csv_rows(sel / "paired_training_domain.csv", holdout)
        out = [f"| method | held-out {holdout} Dice, training-domain selection | − erm [95% CI], Wilcoxon p, cases "
               "| last epoch | oracle (upper bound) |", "|---|---|---|---|---|"]
        for method, row in rules["training_domain"].items():
            p = paired.get(method)
            diff = "reference" if method == "erm" else "n/a" if p is None else (
                f"{_signed(p['mean_diff'])} [{_signed(p['ci_low'])}, {_signed(p['ci_high'])}], "
                f"p {float(p['p']):.2f}, {p['n']}")
            out.append(f"| {method} | {_mean_se(row, holdout)} | {diff} | {_mean_se(rules['last'].get(method), holdout)} "
                       f"| {_mean_se(rules['oracle'].get(method), holdout)} |")
        return "\n".join(out) + "\n"
    return table


def _sweep_argv(sweep: str, preset: str = "smoke") -> Callable[[Path], list[str]]:
    return lambda runs: [sys.executable, "-m", "sweeps.launch", sweep, "--preset", preset, "--runs", str(runs),
                         "--backend", "local"]


def _select_job(name: str, sweep: str, preset: str, about: str) -> Job:
    """A hyperparameter sweep, then `experiments.select` over it (docs/hparams.md)."""
    folder = f"{sweep}-{preset}"
    return Job(name, f"make sweep SWEEP={sweep} PRESET={preset} && make select SWEEP_DIR=runs/{folder}",
               _sweep_argv(sweep, preset), selection_table(sweep, preset), about,
               then=(lambda runs: [sys.executable, "-m", "experiments.select", str(runs / folder)],))


JOBS: dict[str, Job] = {j.name: j for j in [
    Job("demo", "make demo",
        lambda runs: [sys.executable, "-m", "experiments.loso", "--holdout", "mosmed", "experiment=demo",
                      f"paths.runs={runs}"],
        loso_row("make demo", "demo"), "LOSO demo, MosMed held out (about 2-4 min on 2 shared cores)",
        extra=(("demo-output", loso_printout("demo")),)),
    Job("smoke", "python -m experiments.loso --holdout mosmed experiment=smoke",
        lambda runs: [sys.executable, "-m", "experiments.loso", "--holdout", "mosmed", "experiment=smoke",
                      f"paths.runs={runs}"],
        loso_row("python -m experiments.loso --holdout mosmed experiment=smoke", "smoke"), "LOSO smoke (under a minute)"),
    Job("transfer-smoke", "make sweep-transfer PRESET=smoke", _sweep_argv("transfer"),
        sweep_table("transfer", "transfer_matrix"), "transfer matrix, 3 runs (1-2 min)"),
    Job("loso-smoke", "make sweep-loso PRESET=smoke", _sweep_argv("loso"),
        sweep_table("loso", "loso_table"), "LOSO table, 3 runs (1-2 min)"),
    Job("methods-smoke", "make sweep SWEEP=methods PRESET=smoke", _sweep_argv("methods"),
        sweep_table("methods", "methods_table"), "DG methods, 54 runs (about 25 min)"),
    Job("methods", "make sweep SWEEP=methods PRESET=methods", _sweep_argv("methods", "methods"),
        sweep_table("methods", "methods_table", "methods"),
        "DG methods at batch 8 (experiment=methods), 54 runs (about an hour on 2 idle cores)"),
    _select_job("hparams-smoke", "hparams", "smoke", "erm and mixstyle, random search + selection, 6 runs (about 5 min)"),
    _select_job("hparams-methods", "hparams_methods", "methods",
                "every DG method at batch 8, equal random search + selection, 32 runs (about 40 min)"),
    Job("harmonization-smoke", "make sweep SWEEP=harmonization PRESET=smoke", _sweep_argv("harmonization"),
        sweep_table("harmonization", "harmonization_table"), "harmonizer ablation, 12 runs (about 5 min)"),
]}


def versions() -> str:
    def v(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"
    return (f"Python {platform.python_version()}, torch {v('torch')}, MONAI {v('monai')}, "
            f"pytorch-lightning {v('pytorch-lightning')}, NumPy {v('numpy')}")


def machine() -> str:
    try:
        load = f", load average {os.getloadavg()[0]:.1f} at start"
    except OSError:
        load = ""
    return f"{os.cpu_count()} CPU cores{load}"


def stamp(job: Job, wall: float | None, when: dt.date, where: str, libs: str) -> str:
    timing = f"{_fmt_s(wall)} wall" if wall is not None else "wall time not measured (--reuse)"
    return (f"*PHANTOM DATA. `{job.shown}`, rerun by `make readme-numbers` on {when.isoformat()}: {timing}; "
            f"{where}; {libs}.*\n")


def block_pattern(name: str) -> re.Pattern:
    n = re.escape(name)
    return re.compile(rf"^<!-- numbers:{n} -->\n(.*?)^<!-- /numbers:{n} -->$", re.S | re.M)


def blocks_in(text: str) -> list[str]:
    opened = re.findall(r"^<!-- numbers:([\w-]+) -->$", text, re.M)
    closed = re.findall(r"^<!-- /numbers:([\w-]+) -->$", text, re.M)
    if sorted(opened) != sorted(closed):
        raise ValueError(f"unbalanced numbers markers: opened {opened}, closed {closed}")
    return opened


def rewrite(text: str, name: str, content: str) -> tuple[str, int]:
    """Replace every block NAME in text by content; returns (text, number of blocks replaced)."""
    blocks_in(text)
    if not content.endswith("\n"):
        content += "\n"
    return block_pattern(name).subn(lambda m: f"<!-- numbers:{name} -->\n{content}<!-- /numbers:{name} -->", text)


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def files_with(name: str, root: Path = ROOT) -> list[Path]:
    return [p for p in doc_files(root) if name in blocks_in(p.read_text(encoding="utf-8"))]


def apply(name: str, content: str, root: Path = ROOT) -> list[Path]:
    changed = []
    for path in files_with(name, root):
        text = path.read_text(encoding="utf-8")
        new, n = rewrite(text, name, content)
        if n and new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.readme_numbers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help=f"comma-separated jobs (default: demo,smoke,transfer-smoke,loso-smoke); "
                    f"any of {', '.join(JOBS)}, or 'all'")
    ap.add_argument("--dry-run", action="store_true", help="print what would run and be rewritten; run nothing")
    ap.add_argument("--runs", type=Path, help="scratch runs folder (default: a fresh temporary folder)")
    ap.add_argument("--reuse", type=Path, help="read the results of earlier runs under this folder; run nothing")
    ap.add_argument("--wall", type=float, help="with --reuse and one job: the wall time (s) measured when it ran")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository whose README.md and docs/ are rewritten")
    args = ap.parse_args(argv)

    names = [n for n in args.only.split(",") if n] or ["demo", "smoke", "transfer-smoke", "loso-smoke"]
    if names == ["all"]:
        names = list(JOBS)
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        ap.error(f"unknown job(s) {unknown}; known: {', '.join(JOBS)}")
    if args.wall is not None and not (args.reuse and len(names) == 1):
        ap.error("--wall goes with --reuse and one job")
    if args.reuse or args.runs:
        runs = args.reuse or args.runs
    else:
        runs = Path(tempfile.gettempdir(), "readme-numbers-XXXX") if args.dry_run else \
            Path(tempfile.mkdtemp(prefix="readme-numbers-"))
    root = args.root.resolve()
    today, libs = dt.date.today(), versions()

    for name in names:
        job = JOBS[name]
        targets = [str(p.relative_to(root)) for p in files_with(name, root)]
        cmd = job.argv(runs)
        shown_cmds = " && ".join(" ".join(c) for c in (cmd, *(then(runs) for then in job.then)))
        print(f"[readme-numbers] {name}: {job.about}\n  runs: {shown_cmds}\n  rewrites: {', '.join(targets) or 'no block'}",
              flush=True)
        if not targets:
            print(f"  warning: no <!-- numbers:{name} --> block in README.md or docs/", flush=True)
        if args.dry_run:
            continue
        wall = args.wall
        # the load when this job starts (an earlier job's run has ended by then)
        where = f"{os.cpu_count()} CPU cores (load during the run not recorded)" if args.reuse else machine()
        if not args.reuse:
            t0 = time.monotonic()
            env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
            for argv in (cmd, *(then(runs) for then in job.then)):
                subprocess.run(argv, cwd=ROOT, check=True, env=env)
            wall = time.monotonic() - t0
        content = job.table(runs, wall) + "\n" + stamp(job, wall, today, where, libs)
        changed = apply(name, content, root)
        for extra, render in job.extra:
            if files_with(extra, root):
                changed += apply(extra, render(runs), root)
        print(content + f"  rewrote: {', '.join(str(p.relative_to(root)) for p in changed) or 'nothing changed'}",
              flush=True)
    if not args.dry_run:
        print(f"[readme-numbers] runs kept in {runs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
