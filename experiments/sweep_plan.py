"""A sweep's runs, planned for the sweep launcher: `python -m experiments.sweep_plan < request.json`.

`sweeps.launch` expands and launches grids but imports nothing from `experiments`; what only the
experiments can say (the preset's sources, which the `$sources` placeholders expand to, the W&B project,
each run's folder) it asks this program for. Request on stdin, JSON:
`{"spec": <sweep file as loaded by sweeps.expand.load_sweep>, "preset": "smoke", "runs": "runs",
"fixed": ["experiment=smoke", <overrides for every run>]}`. Answer on stdout, JSON: `{"dir", "fixed",
"sources", "project", "runs": [{"overrides", "run_dir"}]}`; a hyperparameter search's runs also carry
`"hparams": {"id", "method", "values", "trial"}` (sweeps.expand.expand_hparams), drawn from the config's
`methods.<name>.search` spaces. A config or sweep error is one line on stderr,
`error: ...`, with exit status 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from experiments.config import load_config
from experiments.runfolder import check_component
from experiments.sweep_run import plan_run
from sweeps.expand import expand, expand_hparams, hparams_block


def plan_sweep(spec: dict, preset: str, runs_root: str | Path, fixed: list[str]) -> dict:
    """The sweep folder, the overrides every run gets, the sources, the W&B project and every run's
    overrides and folder."""
    # the sweep file's `name` becomes a folder: one plain name, never a path out of the runs folder
    sweep_dir = (Path(runs_root) / check_component(f"{spec['name']}-{preset}", "sweep name")).resolve()
    # the preset decides the sources; the sweep grid over them is resolved once, here
    base = load_config([o for o in fixed if not o.startswith("protocol=")])
    sources = list(base.data.sources)
    fixed = [*fixed, f"paths.runs={sweep_dir}", f"wandb.group={sweep_dir.name}"]
    if hparams_block(spec, spec.get("_path", "sweep")) is None:
        planned = [(overrides, None) for overrides in expand(spec, sources)]
    else:  # the search spaces are the config's: the methods' own `search` entries
        searches = {name: OmegaConf.to_container(m["search"]) if m and m.get("search") else None
                    for name, m in base.methods.items()}
        defaults = {name: {k: v for k, v in (OmegaConf.to_container(m) or {}).items() if k != "search"}
                    for name, m in base.methods.items()}
        planned = expand_hparams(spec, sources, searches, str(base.method.name), defaults)
    runs = []
    for overrides, hparams in planned:
        _protocol, _cfg, _plan, run_dir = plan_run(fixed + overrides)
        runs.append({"overrides": fixed + overrides, "run_dir": str(run_dir),
                     **({"hparams": hparams} if hparams is not None else {})})
    return {"dir": str(sweep_dir), "fixed": fixed, "sources": sources, "project": base.wandb.project, "runs": runs}


def main() -> int:
    request = json.load(sys.stdin)
    try:
        answer = plan_sweep(request["spec"], request["preset"], request["runs"], list(request["fixed"]))
    except ValueError as e:  # config and sweep errors name their key or file
        print(f"error: {e}", file=sys.stderr)
        return 2
    json.dump(answer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
