"""Few-shot folds (seed 003, Ma et al.): `python -m experiments.fewshot --task infection [--fold 0|all]`.

Task 1 (default preset `seed003_task1`): COVID-19-CT-Seg's official 5 folds, 4 cases train and the
other 16 test (a test case of a training patient, radiopaedia_10_85902_1/_3, is left out and listed).
`--task` picks the labels: `lung` (Lung_Mask: left and right lung), `infection` (Infection_Mask) or
`lung_infection` (both, Lung_and_Infection_Mask). Task 3: `preset=seed003_task3_infection` adds the
non-COVID sources of Task 2 to the fold's 4 cases. The last epoch is tested (no validation cases, as
the benchmark's nnU-Net baselines). Writes `<paths.runs>/fewshot/<run-name>/` per fold;
`python -m experiments.report <paths.runs>/fewshot --out DIR` averages the folds.
"""
from __future__ import annotations

import argparse
import logging
import sys

from experiments.config import cli_config
from experiments.protocols import run_protocol
from experiments.scale_help import preset_epilog
from rundir.cli import command_name, run_cli

# task -> the COVID-19-CT-Seg mask folder (label policy) that trains and is scored
TASKS = {"lung": "lung", "infection": "infection", "lung_infection": "lung_and_infection"}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog=command_name("python -m experiments.fewshot"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=preset_epilog())
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="which labels train and are scored")
    parser.add_argument("--fold", default="all", help="fold index, or all (default)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. experiment=smoke")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    logging.basicConfig(level=logging.WARNING)
    overrides = list(args.overrides)
    if not any(o.startswith("preset=") for o in overrides):
        overrides.append("preset=seed003_task1")
    base = cli_config(parser, overrides)
    source = base.fewshot.source
    folds = range(len(base.fewshot.folds)) if args.fold == "all" else [int(args.fold)]
    results = []
    for k in folds:
        cfg = cli_config(parser, overrides + [f"fewshot.fold={k}", f"fewshot.task={args.task}",
                                       f"data.policies.{source}={TASKS[args.task]}"])
        results.append(run_protocol("fewshot", cfg))
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.fewshot"))
