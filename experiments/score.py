"""Re-score a run's predictions on files, without a GPU and without the network:

    python -m experiments.score RUN [--out DIR] [--no-hu]

Reads RUN/plan.json (which cases were tested, where their stored images and masks are, which classes each
source annotates), RUN/predictions/<source>/<case_id>.nii.gz and the references through the plan's case
records, and writes per_case.csv and metrics.json into DIR (default: RUN itself), with the keys and values
the run wrote: the run's own test numbers come from this same function. Other selection rules' predictions
(RUN/selection/<rule>/predictions/) are re-scored into DIR/selection/<rule>/per_case.csv.

For other code: `score_predictions(plan, pred_dir, role="test", hu=True) -> (metrics, rows)` scores any
folder of predictions in the common label space for a plan's role (the nnU-Net import calls it), and
`score_run(run_dir, out=None)` does what the command does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments.plan import PlanError
from experiments.stages.score import MissingPredictions, score_predictions, score_run
from rundir.cli import command_name, run_cli

__all__ = ["score_predictions", "score_run", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=command_name("python -m experiments.score"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder (with plan.json and predictions/)")
    parser.add_argument("--out", type=Path, default=None, help="where to write per_case.csv and metrics.json "
                                                               "(default: the run folder)")
    parser.add_argument("--no-hu", action="store_true", help="leave the severity columns out (no image read)")
    args = parser.parse_args(argv)
    before = None
    if (args.run_dir / "metrics.json").is_file():
        before = json.loads((args.run_dir / "metrics.json").read_text(encoding="utf-8"))
    try:
        metrics = score_run(args.run_dir, args.out, hu=not args.no_hu)
    except (PlanError, MissingPredictions, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir
    changed = sorted(k for k in metrics if k.startswith("test/") and before is not None and before.get(k) != metrics[k])
    for k in sorted(metrics):
        if k.startswith("test/") and k.rsplit("/", 1)[-1] in ("dice", "nsd", "hd95"):
            print(f"  {k} = {metrics[k]:.4f}")
    if before is None:
        print(f"scored {args.run_dir}: {out / 'metrics.json'}")
    elif changed:
        print(f"{len(changed)} test value(s) differ from the run's metrics.json: {changed[:8]}")
    else:
        print(f"the run's test metrics reproduced exactly: {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.score"))
