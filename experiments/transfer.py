"""Train on some sources, test on others: `python -m experiments.transfer --train covid19_20 --test mosmed,ctseg`.

`--test` defaults to every source of `data.sources`. A source in both lists is tested in-domain on a
held-out `data.test_fraction` of its patients (the diagonal of a transfer matrix); the others are
tested on all their labelled cases, or with `data.fixed_test_part=true` on that same held-out part, so
every cell of a column scores the same patients. Writes `<paths.runs>/transfer/<run-name>/`.
Seed 004 (Lizzi et al.): `--train covid19_20 --test mosmed,ctseg preset=seed004`.
"""
from __future__ import annotations

import argparse
import logging
import sys

from experiments.config import cli_config
from experiments.protocols import run_protocol
from experiments.scale_help import preset_epilog
from rundir.cli import command_name, run_cli


def _names(text: str) -> str:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no source named in {text!r}")
    return "[" + ",".join(names) + "]"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=command_name("python -m experiments.transfer"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=preset_epilog())
    parser.add_argument("--train", required=True, type=_names, help="training sources, comma-separated")
    parser.add_argument("--test", type=_names, help="test sources, comma-separated (default: data.sources)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. experiment=smoke")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    logging.basicConfig(level=logging.WARNING)
    extra = [f"data.train_sources={args.train}"] + ([f"data.test_sources={args.test}"] if args.test else [])
    cfg = cli_config(parser, args.overrides + extra)
    # sources named on the command line join data.sources, so `--test mosmed` needs no second override
    wanted = list(dict.fromkeys(list(cfg.data.sources) + list(cfg.data.train_sources) + list(cfg.data.test_sources)))
    cfg.data.sources = wanted
    return run_protocol("transfer", cfg)


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.transfer"))
