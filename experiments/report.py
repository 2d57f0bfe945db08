"""Aggregate finished run folders into tables, plots and a markdown report.

    python -m experiments.report RUN_DIR... --out DIR [--metric dice] [--class lesion] [--wandb]
                                 [--bootstrap 2000] [--seed 0]

RUN_DIR is a run folder or any folder above run folders (searched recursively for run folders). A run
folder that is not finished (killed or still running: no run.json; stopped while writing: no `done`;
missing metrics.json or per_case.csv) is skipped with a printed warning naming the reason, and listed
under "Skipped runs" in summary.md. Results whose model selection was degenerate (run.json
`selection.degenerate`) are marked with a dagger. A *configuration* is (kind, experiment, train sources, test
sources, evaluation space); its runs differ only in the seed and are averaged as repeats. For every
configuration, test source and class it reports the mean +- std over seeds of each run's mean over cases,
and a percentile-bootstrap 95 % CI over cases (each case first averaged over seeds). Undefined values
(empty or nan cells, e.g. HD95 when a mask is empty) are left out of every mean and counted.

Writes to --out: summary.md, report.json, tables/*.csv and *.tex, plots/*.png (and wandb/ with --wandb).
Any phantom run marks every table "PHANTOM DATA (synthetic sources)"; mixing phantom and real runs in one
configuration is an error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.reporting.common import METRICS, PHANTOM_MARK, ReportError
from evaluation.reporting.plots import make_plots
from evaluation.reporting.render import write_report
from evaluation.reporting.runs import collect_runs
from evaluation.reporting.tables import build_tables
from evaluation.reporting.wandb_log import log_wandb
from rundir.cli import command_name, run_cli


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=command_name("python -m experiments.report"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or folders above them")
    parser.add_argument("--out", required=True, help="report folder (created)")
    parser.add_argument("--metric", default="dice", choices=METRICS, help="headline and matrix metric (default dice)")
    parser.add_argument("--class", dest="cls", default="lesion", help="headline class (default lesion)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--wandb", action="store_true", help="also log to W&B (WANDB_MODE, default offline)")
    args = parser.parse_args(argv)
    try:
        skipped: list[str] = []
        runs = collect_runs(args.run_dirs, skipped)
        if not runs:
            raise SystemExit(f"error: no finished run (a folder with run.json and done) under {' '.join(args.run_dirs)}"
                             + (f"; {len(skipped)} unfinished run(s) skipped" if skipped else ""))
        tables = build_tables(runs, args.metric, args.cls, args.bootstrap, args.seed, skipped)
        make_plots(tables, args.out)
        written = write_report(tables, args.out)
    except ReportError as e:
        raise SystemExit(f"error: {e}") from None
    if args.wandb:
        log_wandb(tables, written, args.out)
    print(f"report: {Path(args.out) / 'summary.md'} ({len(runs)} runs, {len(tables['matrices'])} matrices, "
          f"{len(tables['plots'])} plots)" + (f"  [{PHANTOM_MARK}]" if tables["meta"]["phantom"] else ""))
    return tables


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.report"))
