"""Run a sweep: `python -m sweeps.launch transfer --preset smoke --runs runs --backend local [key=value ...]`.

Backends are thin launchers, never a scheduler of our own:
- `local` (default): the grid's runs one after another, each in its own process (`experiments.sweep_run`),
  offline unless WANDB_MODE says otherwise. Finished runs are skipped, unfinished ones resume.
- `wandb`: creates the W&B sweep from the resolved file and starts `wandb agent` here; any number of
  machines sharing the runs folder join with the printed `wandb agent ENTITY/PROJECT/ID`. Needs W&B online.
- `slurm`: submits the unfinished runs as one job array through submitit (`pip install submitit`);
  `--slurm KEY=VALUE` passes executor parameters (e.g. slurm_partition=gpu, gpus_per_node=1, timeout_min=600).

The sweep folder is `<runs>/<sweep>-<preset>/`: `sweep.yaml` (resolved), `runs.json` (every run's
overrides, folder and state), the run folders, `report/` and the sweep's headline file
(`transfer_matrix.csv`/`.png`/`.md`, `loso_table.csv`/`.md`, `methods_table.csv`/`.md`,
`harmonization_table.csv`/`.md`).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from rundir.atomic import atomic_write_text, write_json
from rundir.cli import command_name, run_cli
from sweeps.expand import SweepError, hparams_block, load_sweep, wandb_runs_spec, wandb_spec

PRESETS = {"smoke": "smoke", "demo": "demo", "methods": "methods", "full": "default"}  # methods: experiment=methods (8-patch batches)
BACKENDS = ("local", "wandb", "slurm")
# The experiments, as programs: the sweep layer launches them and imports nothing from them (their config,
# protocols and run folders stay theirs). PLAN answers what a sweep's runs are; RUN is one run.
PLAN_PROGRAM = "experiments.sweep_plan"
RUN_PROGRAM = "experiments.sweep_run"


@dataclass
class Sweep:
    """A sweep resolved against its preset: folder, overrides every run gets, sources, runs."""
    dir: Path
    fixed: list[str]        # preset, extra overrides, runs folder and W&B group
    sources: list[str]      # the preset's data.sources, which the `$sources` placeholders expand to
    project: str            # W&B project
    runs: list[dict]        # each run's overrides, folder, `done` and `started`

    @property
    def group(self) -> str:
        return self.dir.name  # `<sweep>-<preset>`: the W&B group of its runs and of its report


def sweep_runs(spec: dict, preset: str, runs_root: Path, extra: list[str]) -> Sweep:
    """The sweep's runs, each with its overrides, folder and whether it is done (planned by PLAN_PROGRAM)."""
    request = {"spec": spec, "preset": preset, "runs": str(runs_root),
               "fixed": [f"experiment={PRESETS[preset]}", *extra]}
    proc = subprocess.run([sys.executable, "-m", PLAN_PROGRAM], input=json.dumps(request), capture_output=True,
                          text=True, encoding="utf-8", env=run_env())
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or [f"{PLAN_PROGRAM} failed with exit status {proc.returncode}"]
        message = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1])
        raise SweepError(message.removeprefix("error: "))
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = [{**r, "done": (Path(r["run_dir"]) / "done").exists(), "started": Path(r["run_dir"]).exists()}
            for r in plan["runs"]]
    return Sweep(Path(plan["dir"]), plan["fixed"], plan["sources"], plan["project"], runs)


def run_env() -> dict[str, str]:
    """The environment a run process gets: ours, minus WANDB_SERVICE. wandb stores its service's address
    there; a child would attach to the parent's service, which still holds the id of a run killed
    mid-way and refuses to resume it ("run ID is in use"). Each run starts its own service."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(cmd: list[str], **popen) -> int:
    """Run `cmd` to its end and return its exit code; SIGTERM or SIGINT to the launcher stops the run first.

    Either signal is passed on as SIGTERM, on which a run stops after its current batch (Lightning), and the
    launcher exits only after the run has: an immediate relaunch never finds the run still going (its folder
    locked, its files being written). SIGTERM even for SIGINT: after a terminal's Ctrl-C the run, in our
    process group, has its own SIGINT already, and a second one would interrupt its graceful stop. The
    launcher then exits with 128 + the signal's number, like a shell."""
    proc = subprocess.Popen(cmd, **popen)
    got: list[int] = []

    def forward(signum, _frame):
        got.append(signum)
        if proc.poll() is None:
            print(f"[sweep] {signal.Signals(signum).name}: stopping run pid {proc.pid} and waiting for it", flush=True)
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if got:
        raise SystemExit(128 + got[0])
    return code


# the metric a finished run's status line shows: the first of these its metrics.json holds
KEY_METRICS = ("test/mean/dice", "test/mean/selection_dice")


def key_metric(run_dir: Path) -> str:
    """`test/mean/dice=0.4123` from a finished run's metrics.json, or '' (no file, no such key)."""
    try:
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    key = next((k for k in KEY_METRICS if isinstance(metrics.get(k), (int, float))), None)
    return f"{key}={metrics[key]:.4f}" if key else ""


def sweep_eta(walls: list[float], remaining: int) -> float | None:
    """Seconds the `remaining` runs will take at the mean wall time of the runs finished so far."""
    return sum(walls) / len(walls) * remaining if walls and remaining else (0.0 if walls else None)


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _run_local(runs: list[dict], log_dir: Path) -> list[dict]:
    """Each unfinished run in its own process, its output in `log_dir/<run>.log`; one status line per run as it
    starts and ends (done with its key metric, or failed), and the sweep's ETA from the finished runs' mean."""
    failed, walls = [], []
    for r in runs:
        if r["done"]:
            print(f"[sweep] skipped (already done) {r['run_dir']} {key_metric(r['run_dir'])}".rstrip(), flush=True)
    todo = [r for r in runs if not r["done"]]
    for i, r in enumerate(todo, 1):
        state = "resuming" if r["started"] else "starting"
        log = log_dir / f"{Path(r['run_dir']).name}.log"
        print(f"[sweep] {i}/{len(todo)} {state} {r['run_dir']} (log {log})", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(log, "a", encoding="utf-8") as fh:
            code = run_child([sys.executable, "-m", RUN_PROGRAM, *r["overrides"]], stdout=fh,
                             stderr=subprocess.STDOUT, env=run_env())
        wall = time.monotonic() - t0
        r["done"] = (Path(r["run_dir"]) / "done").exists()
        r["wall_s"] = round(wall, 1)
        if code or not r["done"]:
            print(f"[sweep] {i}/{len(todo)} FAILED (exit {code}) after {clock(wall)}: {r['run_dir']}; log {log}", flush=True)
            failed.append(r)
        else:
            walls.append(wall)  # a failed run's time says nothing about the others'
            print(f"[sweep] {i}/{len(todo)} done in {clock(wall)}: {r['run_dir']} {key_metric(r['run_dir'])}".rstrip(),
                  flush=True)
        if i < len(todo):
            eta = sweep_eta(walls, len(todo) - i)
            print(f"[sweep] {len(todo) - i} run(s) left, ETA {clock(eta)}"
                  + (f" (mean {clock(sum(walls) / len(walls))} per finished run)" if walls else ""), flush=True)
    return failed


def _run_wandb(spec: dict, sweep: Sweep) -> None:
    import wandb

    if hparams_block(spec) is None:
        config = wandb_spec(spec, sweep.sources, sweep.fixed)
    else:  # drawn configurations are no grid of values: the agent runs the listed runs
        config = wandb_runs_spec(spec, [r["overrides"] for r in sweep.runs], sweep.fixed)
    resolved = sweep.dir / "wandb_sweep.yaml"
    atomic_write_text(resolved, yaml.safe_dump(config, sort_keys=False))
    if os.environ.get("WANDB_MODE", "offline") in ("offline", "disabled"):
        raise SystemExit(f"BACKEND=wandb needs W&B online (WANDB_MODE=online and `wandb login`); the resolved "
                         f"sweep is in {resolved} for `wandb sweep` elsewhere")
    sweep_id = wandb.sweep(config, project=sweep.project)
    print(f"[sweep] W&B sweep {sweep_id}: more machines join with `wandb agent <entity>/{sweep.project}/{sweep_id}` "
          f"(run from the repository root, with {sweep.dir} on a shared filesystem)", flush=True)
    target = sweep_id if "/" in sweep_id else f"{sweep.project}/{sweep_id}"
    subprocess.run(["wandb", "agent", target], check=True, env=run_env())


def _run_slurm(runs: list[dict], sweep_dir: Path, params: list[str], cluster: str | None) -> list[dict]:
    try:
        import submitit
    except ImportError as e:
        raise SystemExit("BACKEND=slurm needs submitit: pip install submitit") from e
    todo = [r for r in runs if not r["done"]]
    executor = submitit.AutoExecutor(folder=str(sweep_dir / "slurm"), cluster=cluster)
    kwargs = {}
    for item in params:
        key, value = item.split("=", 1)
        kwargs[key] = int(value) if value.isdigit() else value
    executor.update_parameters(**{"timeout_min": 600, "name": sweep_dir.name, **kwargs})
    commands = [submitit.helpers.CommandFunction([sys.executable, "-m", RUN_PROGRAM, *r["overrides"]],
                                                 cwd=str(Path.cwd()), env=run_env()) for r in todo]
    jobs = executor.map_array(lambda command: command(), commands) if commands else []
    for job, r in zip(jobs, todo):
        print(f"[sweep] submitted {job.job_id}: {r['run_dir']}", flush=True)
    failed = []
    for job, r in zip(jobs, todo):
        try:
            job.result()
        except Exception as e:  # submitit re-raises the job's failure; keep the others going
            print(f"[sweep] FAILED {job.job_id}: {r['run_dir']}: {e}", flush=True)
        r["done"] = (Path(r["run_dir"]) / "done").exists()
        if not r["done"]:
            failed.append(r)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=command_name("python -m sweeps.launch"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep name in sweeps/ (transfer, loso, ...) or a YAML file")
    parser.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="scale preset (default smoke)")
    parser.add_argument("--runs", default="runs", help="folder holding sweep folders (default runs)")
    parser.add_argument("--backend", default="local", choices=BACKENDS)
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help="submitit parameter")
    parser.add_argument("--slurm-cluster", default=None, help="submitit cluster (default: auto; `local` to test)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, key=value")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    try:
        spec = load_sweep(args.sweep)
        sweep = sweep_runs(spec, args.preset, Path(args.runs), args.overrides)
    except (SweepError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    sweep_dir, runs = sweep.dir, sweep.runs
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "sweep.yaml", yaml.safe_dump(
        {k: v for k, v in spec.items() if not k.startswith("_")}, sort_keys=False))
    # the plan, before anything runs: which runs the sweep holds (a hyperparameter search's configurations
    # among them), for experiments.select and for agents joining from elsewhere; rewritten with states at the end
    write_json(sweep_dir / "runs.json", {"sweep": spec["name"], "preset": args.preset, "backend": args.backend,
                                         "runs": runs, "wall_s": None})
    n_done = sum(r["done"] for r in runs)
    print(f"[sweep] {spec['name']} ({args.preset}) in {sweep_dir}: {len(runs)} runs, {n_done} finished (skipped), "
          f"{sum(r['started'] and not r['done'] for r in runs)} to resume, "
          f"{sum(not r['started'] for r in runs)} to start", flush=True)
    if args.dry_run:
        for r in runs:
            print(f"  {'done' if r['done'] else 'todo'}  {r['run_dir']}")
        return 0
    t0 = time.time()
    failed: list[dict] = []
    if args.backend == "local":
        failed = _run_local(runs, sweep_dir / "logs")
    elif args.backend == "slurm":
        failed = _run_slurm(runs, sweep_dir, args.slurm, args.slurm_cluster)
    else:
        _run_wandb(spec, sweep)
        for r in runs:
            r["done"] = (Path(r["run_dir"]) / "done").exists()
    write_json(sweep_dir / "runs.json", {"sweep": spec["name"], "preset": args.preset, "backend": args.backend,
                                         "runs": runs, "wall_s": round(time.time() - t0, 1)})
    if failed or not all(r["done"] for r in runs):
        print(f"[sweep] {len(failed) or sum(not r['done'] for r in runs)} run(s) unfinished; rerun the same "
              "command to resume them. No summary written.", flush=True)
        return 1
    from sweeps.summary import summarize_sweep  # matplotlib and the report only at the end

    summary = summarize_sweep(sweep_dir, (spec.get("covid_dg") or {}).get("report"),
                              wandb_group=sweep.group)
    print(f"[sweep] all {len(runs)} runs finished; report {summary['report']}", flush=True)
    for name in ("transfer_matrix.csv", "transfer_matrix.png", "loso_table.csv", "methods_table.md",
                 "harmonization_table.md"):
        if (sweep_dir / name).exists():
            print(f"[sweep] {sweep_dir / name}", flush=True)
    if hparams_block(spec) is not None:
        print(f"[sweep] choose hyperparameters and epochs per selection rule: python -m experiments.select {sweep_dir}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m sweeps.launch"))
