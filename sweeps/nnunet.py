"""nnU-Net v2 as an external baseline on the plans of a finished sweep, through the same backends.

    python -m sweeps.nnunet SWEEP_DIR [--backend local|slurm] [--id 501] [--configuration 3d_fullres]
        [--fold 0] [--nnunet-bin DIR] [--root DIR] [--classes lesion,...] [--dry-run] [--slurm KEY=VALUE ...]

For every finished run folder with a `plan.json` below SWEEP_DIR (a LOSO or transfer sweep; nnU-Net
imports are skipped) one job runs, as a bash script `<root>/jobs/<run>.sh` with nnUNet_raw,
nnUNet_preprocessed and nnUNet_results set under `<root>` (default `SWEEP_DIR/nnunet`):

    python -m experiments.export_nnunet RUN --out $nnUNet_raw --id ID --name NAME
    nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres --verify_dataset_integrity
    nnUNetv2_train ID 3d_fullres 0 --c                       (continues from its last checkpoint)
    nnUNetv2_predict -i $nnUNet_raw/DatasetID_NAME/imagesTs -o <root>/predictions/DatasetID_NAME -d ID -c 3d_fullres -f 0
    python -m experiments.import_nnunet <root>/predictions/DatasetID_NAME --plan RUN/plan.json --runs SWEEP_DIR

Dataset ids count up from `--id` in the order of the run folders. `local` runs the jobs one after another
(log `<root>/logs/<run>.log`); `slurm` submits them as one job array through submitit. A job that
finished writes `<root>/jobs/<run>.done` and is skipped next time. nnU-Net's executables come from PATH or
`--nnunet-bin` (the `bin/` of the environment nnU-Net is installed in). The imports land in SWEEP_DIR, so
`python -m experiments.report SWEEP_DIR` shows nnU-Net beside the sweep's methods.

Imports nothing from `experiments`: each step is its own process.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rundir.cli import command_name

NAME_RE = re.compile(r"[^A-Za-z0-9_-]+")  # experiments.export_nnunet.safe_name


@dataclass
class Job:
    run_dir: Path
    dataset_id: int
    name: str
    script: Path
    commands: list[list[str]]
    env: dict[str, str]

    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"

    @property
    def done(self) -> Path:
        return self.script.with_suffix(".done")


def plan_runs(sweep_dir: Path) -> list[Path]:
    """Finished run folders with a plan below `sweep_dir`, except nnU-Net's own imports."""
    out = []
    for plan in sorted(sweep_dir.rglob("plan.json")):
        run = plan.parent
        if not (run / "done").exists() or not (run / "run.json").is_file():
            continue
        if json.loads((run / "run.json").read_text(encoding="utf-8")).get("method") == "nnunet":
            continue
        out.append(run)
    return out


def job_for(run_dir: Path, dataset_id: int, root: Path, runs: Path, configuration: str = "3d_fullres", fold: int = 0,
            nnunet_bin: Path | None = None, python: str = sys.executable, classes: str | None = None) -> Job:
    """The commands of one plan's nnU-Net baseline (module docstring)."""
    name = NAME_RE.sub("_", run_dir.name).strip("_") or "plan"
    raw, pre, res = root / "raw", root / "preprocessed", root / "results"
    dataset = f"Dataset{dataset_id:03d}_{name}"
    pred = root / "predictions" / dataset

    def tool(cmd: str) -> str:
        return str(nnunet_bin / cmd) if nnunet_bin else cmd

    export = [python, "-m", "experiments.export_nnunet", str(run_dir), "--out", str(raw), "--id", str(dataset_id),
              "--name", name, "--preprocessed", str(pre)] + (["--classes", classes] if classes else [])
    commands = [
        export,
        [tool("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", configuration, "--verify_dataset_integrity"],
        [tool("nnUNetv2_train"), str(dataset_id), configuration, str(fold), "--c"],
        [tool("nnUNetv2_predict"), "-i", str(raw / dataset / "imagesTs"), "-o", str(pred), "-d", str(dataset_id),
         "-c", configuration, "-f", str(fold)],
        [python, "-m", "experiments.import_nnunet", str(pred), "--plan", str(run_dir / "plan.json"), "--runs", str(runs)],
    ]
    env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res)}
    return Job(run_dir, dataset_id, name, root / "jobs" / f"{name}.sh", commands, env)


def script_text(job: Job, cwd: Path) -> str:
    lines = ["#!/usr/bin/env bash", f"# nnU-Net baseline on the plan of {job.run_dir}", "set -euo pipefail",
             f"cd {shlex.quote(str(cwd))}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in job.env.items()]
    lines += [shlex.join(c) for c in job.commands]
    lines.append(f"touch {shlex.quote(str(job.done))}")
    return "\n".join(lines) + "\n"


def make_jobs(sweep_dir: Path, first_id: int, root: Path | None = None, **kwargs) -> list[Job]:
    sweep_dir = sweep_dir.resolve()
    root = (root or sweep_dir / "nnunet").resolve()
    runs = plan_runs(sweep_dir)
    if not runs:
        raise SystemExit(f"error: no finished run folder with a plan.json under {sweep_dir}")
    if first_id + len(runs) - 1 > 999:
        raise SystemExit(f"error: {len(runs)} plans need dataset ids {first_id}..{first_id + len(runs) - 1}; nnU-Net's end at 999")
    return [job_for(run, first_id + i, root, sweep_dir, **kwargs) for i, run in enumerate(runs)]


def write_scripts(jobs: list[Job], cwd: Path) -> None:
    for job in jobs:
        job.script.parent.mkdir(parents=True, exist_ok=True)
        job.script.write_text(script_text(job, cwd), encoding="utf-8")
        job.script.chmod(0o755)


def run_local(jobs: list[Job]) -> list[Job]:
    from sweeps.launch import run_child, run_env  # the launcher's signal handling and child environment

    failed = []
    for i, job in enumerate(jobs, 1):
        log = job.script.parent.parent / "logs" / f"{job.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[nnunet] {i}/{len(jobs)} {job.dataset} ({job.run_dir}); log {log}", flush=True)
        with open(log, "a", encoding="utf-8") as fh:
            code = run_child(["bash", str(job.script)], stdout=fh, stderr=subprocess.STDOUT, env=run_env())
        if code or not job.done.exists():
            print(f"[nnunet] FAILED (exit {code}): {job.dataset}; log {log}", flush=True)
            failed.append(job)
    return failed


def run_slurm(jobs: list[Job], folder: Path, params: list[str], cluster: str | None) -> list[Job]:
    try:
        import submitit
    except ImportError as e:
        raise SystemExit("BACKEND=slurm needs submitit: pip install submitit") from e
    from sweeps.launch import run_env

    executor = submitit.AutoExecutor(folder=str(folder / "slurm"), cluster=cluster)
    kwargs = {k: (int(v) if v.isdigit() else v) for k, v in (p.split("=", 1) for p in params)}
    executor.update_parameters(**{"timeout_min": 1440, "name": "nnunet", **kwargs})
    commands = [submitit.helpers.CommandFunction(["bash", str(j.script)], cwd=str(Path.cwd()), env=run_env())
                for j in jobs]
    handles = executor.map_array(lambda command: command(), commands) if commands else []
    failed = []
    for handle, job in zip(handles, jobs):
        print(f"[nnunet] submitted {handle.job_id}: {job.dataset}", flush=True)
    for handle, job in zip(handles, jobs):
        try:
            handle.result()
        except Exception as e:  # submitit re-raises the job's failure; keep the others going
            print(f"[nnunet] FAILED {handle.job_id}: {job.dataset}: {e}", flush=True)
        if not job.done.exists():
            failed.append(job)
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=command_name("python -m sweeps.nnunet"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path, help="a finished sweep folder (or any folder above run folders)")
    ap.add_argument("--backend", default="local", choices=("local", "slurm"))
    ap.add_argument("--id", type=int, default=501, dest="first_id", help="first nnU-Net dataset id (default 501)")
    ap.add_argument("--configuration", default="3d_fullres")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--root", type=Path, default=None, help="nnU-Net folders and job scripts (default SWEEP_DIR/nnunet)")
    ap.add_argument("--nnunet-bin", type=Path, default=None, help="folder of the nnUNetv2_* executables (default: PATH)")
    ap.add_argument("--classes", default=None, help="passed to export_nnunet --classes")
    ap.add_argument("--dry-run", action="store_true", help="write the job scripts and list them; run nothing")
    ap.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help="submitit parameter")
    ap.add_argument("--slurm-cluster", default=None, help="submitit cluster (default: auto; `local` to test)")
    args = ap.parse_args(argv)
    jobs = make_jobs(args.sweep_dir, args.first_id, args.root, configuration=args.configuration, fold=args.fold,
                     nnunet_bin=args.nnunet_bin.resolve() if args.nnunet_bin else None, classes=args.classes)
    write_scripts(jobs, Path.cwd())
    todo = [j for j in jobs if not j.done.exists()]
    print(f"[nnunet] {len(jobs)} plans, {len(jobs) - len(todo)} finished (skipped), {len(todo)} to run", flush=True)
    if args.dry_run:
        for j in jobs:
            print(f"  {'done' if j.done.exists() else 'todo'}  {j.dataset}  {j.script}")
        return 0
    failed = run_local(todo) if args.backend == "local" else run_slurm(todo, jobs[0].script.parent.parent,
                                                                      args.slurm, args.slurm_cluster)
    if failed:
        print(f"[nnunet] {len(failed)} job(s) failed; rerun the same command to retry them", flush=True)
        return 1
    print(f"[nnunet] done; python -m experiments.report {args.sweep_dir} --out REPORT shows nnU-Net beside the sweep",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
