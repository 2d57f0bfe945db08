"""Leave-one-source-out: `python -m experiments.loso --holdout mosmed [experiment=smoke] [key=value ...]`.

Trains on every configured source except the held-out one (validation from the training sources only),
tests on all labelled cases of the held-out source, and writes `<paths.runs>/loso/<run-name>/`.
"""
from __future__ import annotations

import argparse
import logging
import sys

from experiments.config import cli_config
from experiments.protocols import run_protocol
from experiments.scale_help import preset_epilog
from rundir.cli import command_name, run_cli


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=command_name("python -m experiments.loso"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=preset_epilog())
    parser.add_argument("--holdout", required=True, help="source to hold out (e.g. mosmed)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. experiment=smoke")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    logging.basicConfig(level=logging.WARNING)
    cfg = cli_config(parser, args.overrides + [f"data.holdout={args.holdout}"])
    if args.holdout not in cfg.data.sources:
        parser.error(f"--holdout {args.holdout!r} is not in data.sources {list(cfg.data.sources)}")
    return run_protocol("loso", cfg)


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.loso"))
