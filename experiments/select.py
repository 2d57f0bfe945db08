"""Model selection across a finished sweep, DomainBed-style: `python -m experiments.select SWEEP_DIR [--out DIR]`.

1. Choose (validation only). Every finished run of the sweep is a candidate for its cell (method,
   held-out source, trial = run.seed); its hyperparameter configuration comes from the sweep's `runs.json`
   (a `sweeps/hparams.yaml` search; configuration 0 is the method's default). Per selection rule, the rule
   picks an epoch in each run from its `records.jsonl` and the best run of the cell on the rule's score
   (evaluation.sweep_selection): training_domain / loso / last on validation, the oracle on the test cases
   (reported beside the others as an upper bound, never the headline). Nothing else is read before the
   choice: no metrics.json, no per_case.csv.
2. Test the chosen checkpoints only: each chosen (run, step) is re-tested through the predict and score
   stages (experiments.test_run) into `OUT/tests/<run>-step<step>/` (kept: a rerun reuses it).
   `--from-run` reads the per-case scores the run itself wrote for those weights instead (no re-test).
3. Tables (`OUT/`, written atomically): per rule, `table_<rule>.csv` (rows = methods, columns = held-out
   sources + mean, cells mean ± standard error over trials of the held-out lesion Dice); `paired_<rule>.csv`
   (each method against erm on the same held-out cases: mean per-case difference, bootstrap 95% CI, Wilcoxon
   signed-rank p) and `forest_<rule>.png`; `selection.md` (all of it, the runs' own rule first),
   `selection.json` (every choice: run, hyperparameters, epoch, step, validation score, checkpoint). Unless
   W&B is disabled, the tables and plots are logged as one W&B run (offline unless WANDB_MODE says otherwise).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

from evaluation.records import RunInfo
from evaluation.reporting.common import PHANTOM_MARK
from evaluation.reporting.render import fmt, to_markdown
from evaluation.selection_rules import read_records
from evaluation.sweep_selection import MEAN, Candidate, Choice, cells, choose_in_sweep, paired_vs_baseline, trial_means
from rundir.atomic import atomic_write_text, write_csv, write_json
from rundir.cli import command_name, run_cli

RULE_ORDER = ("training_domain", "loso", "last", "oracle")
BASELINE = "erm"
N_BOOT = 2000
OUT = "selection"


class SelectError(ValueError):
    pass


# ---------------------------------------------------------------- reading the sweep (validation side only)

def run_folders(sweep_dir: Path) -> list[Path]:
    """Finished run folders (run.json and `done`) under the sweep folder, outside selection outputs."""
    out = []
    for info in sorted(Path(sweep_dir).rglob("run.json")):
        d = info.parent
        if (d / "done").exists() and OUT not in d.relative_to(sweep_dir).parts[:1]:
            out.append(d)
    return out


def sweep_hparams(sweep_dir: Path) -> dict[str, dict] | None:
    """Resolved run folder -> its `hparams` entry in the sweep's runs.json ({} for a run of a plain grid);
    None without a runs.json."""
    path = Path(sweep_dir) / "runs.json"
    if not path.is_file():
        return None
    try:
        runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
        return {str(Path(r["run_dir"]).resolve()): r.get("hparams") or {} for r in runs}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SelectError(f"{path}: not a sweep's runs.json ({e})") from None


def candidates(sweep_dir: Path) -> tuple[list[Candidate], dict[str, RunInfo]]:
    """Every finished run as a Candidate (its records and hyperparameters), and its run.json by folder."""
    folders = run_folders(sweep_dir)
    if not folders:
        raise SelectError(f"{sweep_dir}: no finished run (run.json and done) under it")
    hp = sweep_hparams(sweep_dir)
    if hp is not None:  # the sweep's plan decides: a finished folder of an earlier plan is no candidate
        for d in [d for d in folders if str(d.resolve()) not in hp]:
            print(f"[select] {d}: not a run of the sweep's runs.json, left out", flush=True)
        folders = [d for d in folders if str(d.resolve()) in hp]
    out, infos = [], {}
    for d in folders:
        info = RunInfo.read(d / "run.json")
        records = read_records(d)
        if not records:
            raise SelectError(f"{d / 'records.jsonl'}: missing or empty: the run predates epoch records; "
                              "rerun it (run.overwrite=true) to select across the sweep")
        h = (hp or {}).get(str(d.resolve()), {})
        out.append(Candidate(run=str(d), method=str(info.method), holdout="+".join(info.test_sources),
                             trial=int(info.seed or 0), hparams_id=int(h.get("id", 0)),
                             hparams=dict(h.get("values", {})), records=tuple(records),
                             val_source=(info.split_args or {}).get("val_source")))
        infos[str(d)] = info
    return out, infos


def rules_of(infos: dict[str, RunInfo], wanted: list[str] | None) -> tuple[str, list[str]]:
    """(headline rule: the runs' own selection.method, the rules to report). A rule is reported only where
    every run kept its checkpoint (run.json selection.checkpoints): the rules re-applied to the records pick
    the epochs those checkpoints hold."""
    heads = {str(i.selection.get("method")) for i in infos.values()}
    if len(heads) != 1:
        raise SelectError(f"the sweep's runs select with different rules {sorted(heads)}: one headline rule a sweep")
    head = heads.pop()
    kept = set.intersection(*[set(i.selection.get("checkpoints", {})) for i in infos.values()])
    if not kept:
        raise SelectError("no selection rule's checkpoint was kept by every run (run.json selection.checkpoints)")
    rules = sorted(kept, key=lambda r: (r != head, RULE_ORDER.index(r) if r in RULE_ORDER else 99))
    if wanted:
        missing = [r for r in wanted if r not in kept]
        if missing:
            raise SelectError(f"--rules {missing}: not every run kept that rule's checkpoint (add it to "
                              f"selection.report in the sweep file); available {rules}")
        rules = [r for r in rules if r in wanted]
    return head, rules


def checkpoint_of(choice: Choice, info: RunInfo) -> tuple[str, str]:
    """(rule name in run.json, checkpoint file) holding the chosen record's weights, found by global step."""
    run_dir = Path(choice.candidate.run)
    kept = info.selection.get("checkpoints", {})
    # the rule's own file first (it holds these weights unless the sweep-level rule differs), then any other
    for name, c in sorted(kept.items(), key=lambda kv: kv[0] != choice.rule):
        if c.get("global_step") is not None and int(c["global_step"]) == choice.step:
            path = Path(c["path"])
            path = path if path.is_absolute() or path.exists() else run_dir / path
            if path.exists():
                return name, str(path)
    raise SelectError(f"{run_dir}: rule {choice.rule!r} chose step {choice.step} (epoch {choice.record.get('epoch')}) "
                      f"but the run kept no checkpoint of that step ({sorted(info.selection.get('checkpoints', {}))}); "
                      "the `last` rule needs the final epoch validated (trainer.max_epochs a multiple of "
                      "check_val_every_n_epoch)")


# ---------------------------------------------------------------- after the choice: test-domain scores

def read_case_scores(per_case: Path, metric: str = "dice", cls: str = "lesion") -> dict[str, float]:
    """`source/case` -> the metric of class `cls` in a per_case.csv's test rows (NaN where undefined)."""
    out = {}
    with open(per_case, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("split", "test") != "test" or row.get("class") != cls:
                continue
            try:
                out[f"{row['source']}/{row['case']}"] = float(row[metric]) if row[metric] != "" else math.nan
            except (KeyError, ValueError):
                raise SelectError(f"{per_case}: no number in column {metric!r} for case {row.get('case')}") from None
    if not out:
        raise SelectError(f"{per_case}: no test rows of class {cls!r}")
    return out


def retest(run_dir: str, rule_name: str, ckpt: str, out: Path) -> Path:
    """Test one chosen checkpoint through the predict and score stages (experiments.test_run) into `out`;
    a finished earlier test of the same checkpoint is reused. Returns its per_case.csv."""
    done = out / "metrics.json"
    if done.is_file() and (out / "per_case.csv").is_file():
        if json.loads(done.read_text(encoding="utf-8")).get("checkpoint") == ckpt:
            return out / "per_case.csv"
    from experiments import test_run  # torch and the data modules: only when something is tested

    print(f"[select] testing {ckpt}", flush=True)
    test_run.main([run_dir, "--out", str(out), "--selection", rule_name])
    return out / "per_case.csv"


def run_own_scores(run_dir: str, rule_name: str, info: RunInfo) -> Path:
    """The per_case.csv the run wrote for rule `rule_name`'s checkpoint (`--from-run`)."""
    head = info.selection.get("method")
    d = Path(run_dir)
    if rule_name == head:
        return d / "per_case.csv"
    own = d / "selection" / rule_name / "per_case.csv"
    if own.is_file():
        return own
    steps = {n: c.get("global_step") for n, c in info.selection.get("checkpoints", {}).items()}
    if steps.get(rule_name) == steps.get(head):  # the run tested these weights once, as its headline
        return d / "per_case.csv"
    raise SelectError(f"{own}: missing (the run's own test of rule {rule_name!r}); drop --from-run to re-test")


# ---------------------------------------------------------------- outputs

def _cell(c: dict | None) -> str:
    if not c or not math.isfinite(c["mean"]):
        return "n/a"
    return fmt(c["mean"]) + (f" ± {fmt(c['se'])}" if math.isfinite(c["se"]) else "")


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def table_rows(table: dict) -> list[dict]:
    rows = []
    for m in table["methods"]:
        row = {"method": m}
        for h in table["columns"]:
            c = table["cells"].get((m, h))
            row[h] = c["mean"] if c else math.nan
            if h != MEAN:
                row[f"{h}_se"] = c["se"] if c else math.nan
                row[f"{h}_n_trials"] = c["n"] if c else 0
        rows.append(row)
    return rows


def forest_plot(paired: list[dict], path: Path, title: str, phantom: bool) -> None:
    """Per method and held-out source (and pooled), mean paired difference from erm with its bootstrap CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in paired if math.isfinite(r["mean_diff"])]
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.4 * max(1, len(rows))))
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        lo, hi = r["ci_low"], r["ci_high"]
        ax.errorbar(r["mean_diff"], y, xerr=[[r["mean_diff"] - lo], [hi - r["mean_diff"]]], fmt="D" if
                    r["holdout"] == MEAN else "o", color="k" if r["holdout"] == MEAN else "C0", capsize=3)
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [f"{r['method']} | {r['holdout']} (n={r['n']}, p={_p(r['p'])})"
                                     for r in reversed(rows)])
    ax.set_xlabel(f"held-out lesion Dice: method - {BASELINE} (mean per case, 95% bootstrap CI)")
    ax.set_title(("PHANTOM DATA: " if phantom else "") + title, fontsize=10)
    if not rows:
        ax.text(0.5, 0.5, f"no method to compare with {BASELINE}", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def rule_title(rule: str, head: str) -> str:
    note = {"training_domain": "training-domain validation (validation patients of the training sources)",
            "loso": "leave-one-source-out validation (a whole training source validates)",
            "last": "last epoch (hyperparameters on training-domain validation)",
            "oracle": "ORACLE: test-domain selection, an upper bound that saw held-out labels"}.get(rule, rule)
    return f"{rule}{' (the runs’ own rule: headline)' if rule == head else ''}: {note}"


def write_outputs(out: Path, head: str, rules: list[str], results: dict, phantom: bool, metric: str, n_boot: int,
                  sweep_dir: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    mark = f"**{PHANTOM_MARK}**\n\n" if phantom else ""
    md = [f"{mark}# Model selection across the sweep `{sweep_dir.name}`\n",
          f"Held-out lesion {metric} of the checkpoint each rule chose per (method, held-out source, trial) over every "
          f"hyperparameter configuration and epoch of the sweep (DomainBed). Cells: mean ± standard error over trials "
          f"(seeds); `mean`: the mean of the held-out sources' means. Paired statistics: each method minus "
          f"{BASELINE} on the same held-out cases (per case, averaged over the trials both have), 95% percentile "
          f"bootstrap CI over cases ({n_boot} resamples, seed 0), two-sided Wilcoxon signed-rank p.\n"]
    for rule in rules:
        res = results[rule]
        table, paired = res["table"], res["paired"]
        rows = table_rows(table)
        write_csv(out / f"table_{rule}.csv", rows, first=["method", *table["columns"]])
        write_csv(out / f"paired_{rule}.csv", paired, first=["method", "holdout", "mean_diff", "ci_low", "ci_high", "p", "n"])
        forest_plot(paired, out / f"forest_{rule}.png", f"{rule}: each method vs {BASELINE}", phantom)
        files.update({f"table_{rule}": out / f"table_{rule}.csv", f"paired_{rule}": out / f"paired_{rule}.csv",
                      f"forest_{rule}": out / f"forest_{rule}.png"})
        md.append(f"\n## {rule_title(rule, head)}\n\n" + to_markdown(
            ["method", *table["columns"]],
            [[m, *[_cell(table["cells"].get((m, h))) for h in table["columns"]]] for m in table["methods"]]) + "\n")
        if paired:
            md.append(f"\nPaired vs {BASELINE}:\n\n" + to_markdown(
                ["method", "held-out", "mean diff", "95% CI", "Wilcoxon p", "cases"],
                [[r["method"], r["holdout"], f"{r['mean_diff']:+.3f}", f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]",
                  _p(r["p"]), str(r["n"])] for r in paired]) + f"\n\n![forest plot](forest_{rule}.png)\n")
        md.append("\nChosen:\n\n" + to_markdown(
            ["method", "held-out", "trial", "hparams", "epoch", "step", "score"],
            [[c["method"], c["holdout"], str(c["trial"]), f"{c['hparams_id']} {json.dumps(c['hparams'])}",
              str(c["epoch"]), str(c["step"]), fmt(c["score"]) if c["score"] is not None else "n/a"]
             for c in res["choices"]]) + "\n")
    atomic_write_text(out / "selection.md", "".join(md))
    files["md"] = out / "selection.md"
    write_json(out / "selection.json", {
        "sweep": str(sweep_dir), "data": "phantom" if phantom else "real", "headline": head, "rules": rules,
        "metric": metric, "class": "lesion", "baseline": BASELINE, "n_boot": n_boot,
        "results": {r: {"choices": results[r]["choices"], "table": table_rows(results[r]["table"]),
                        "paired": results[r]["paired"]} for r in rules}})
    files["json"] = out / "selection.json"
    return files


def log_wandb(files: dict[str, Path], out: Path, group: str, phantom: bool) -> str:
    """The tables (wandb.Table) and forest plots (wandb.Image) as one W&B run, job_type `selection`;
    offline unless WANDB_MODE says otherwise, and an online start without network gives up after 60 s."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    mode = os.environ.get("WANDB_MODE") or "offline"
    run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "covid-dg", job_type="selection", mode=mode,
                     dir=str(out), group=group, tags=["phantom" if phantom else "real"],
                     settings=wandb.Settings(init_timeout=60))
    try:
        logged = {}
        for key, path in files.items():
            if path.suffix == ".csv":
                with open(path, encoding="utf-8", newline="") as fh:
                    rows = list(csv.reader(fh))
                logged[f"selection/{key}"] = wandb.Table(columns=rows[0], data=rows[1:], allow_mixed_types=True)
            elif path.suffix == ".png":
                logged[f"selection/{key}"] = wandb.Image(str(path), caption=key)
        run.log(logged)
        run.summary.update({"phantom": phantom})
        return str(getattr(run, "dir", ""))
    finally:
        wandb.finish()
        wandb.teardown()


# ---------------------------------------------------------------- the command

def select_sweep(sweep_dir: Path, out: Path | None = None, rules: list[str] | None = None, from_run: bool = False,
                 metric: str = "dice", n_boot: int = N_BOOT, use_wandb: bool = True) -> dict:
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir / OUT
    cands, infos = candidates(sweep_dir)
    head, rules = rules_of(infos, rules)
    phantom = any(i.data == "phantom" for i in infos.values())
    # 1. every rule's choice, from the records alone
    chosen = {rule: choose_in_sweep(rule, cands) for rule in rules}
    # 2. only now: the chosen checkpoints' test scores (each distinct checkpoint once)
    scored: dict[tuple[str, int], dict[str, float]] = {}
    results = {}
    for rule in rules:
        case_scores, listing = {}, []
        for cell, ch in chosen[rule].items():
            info = infos[ch.candidate.run]
            name, ckpt = checkpoint_of(ch, info)
            key = (ch.candidate.run, ch.step)
            if key not in scored:
                per_case = run_own_scores(ch.candidate.run, name, info) if from_run else retest(
                    ch.candidate.run, name, ckpt, out / "tests" / f"{Path(ch.candidate.run).name}-step{ch.step}")
                scored[key] = read_case_scores(per_case, metric)
            case_scores[cell] = scored[key]
            listing.append({"method": cell[0], "holdout": cell[1], "trial": cell[2], "run": ch.candidate.run,
                            "hparams_id": ch.candidate.hparams_id, "hparams": ch.candidate.hparams,
                            "epoch": ch.record.get("epoch"), "step": ch.step, "score": ch.score,
                            "checkpoint": ckpt})
        results[rule] = {"choices": listing, "table": cells(trial_means(case_scores), BASELINE),
                         "paired": paired_vs_baseline(case_scores, BASELINE, n_boot=n_boot, seed=0)}
    files = write_outputs(out, head, rules, results, phantom, metric, n_boot, sweep_dir)
    summary = {"out": str(out), "headline": head, "rules": rules, "files": {k: str(v) for k, v in files.items()},
               "tested": len(scored)}
    if use_wandb and os.environ.get("WANDB_MODE", "offline") != "disabled":
        summary["wandb"] = log_wandb(files, out, sweep_dir.name, phantom)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=command_name("python -m experiments.select"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a finished sweep folder (e.g. runs/hparams-smoke)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default SWEEP_DIR/selection)")
    parser.add_argument("--rules", default=None, help="comma-separated rules (default: every rule the runs kept)")
    parser.add_argument("--from-run", action="store_true", help="use the runs' own test scores of the chosen "
                        "checkpoints instead of re-testing them")
    parser.add_argument("--metric", default="dice", help="per_case.csv column to report (default dice)")
    parser.add_argument("--n-boot", type=int, default=N_BOOT, help=f"bootstrap resamples (default {N_BOOT})")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    args = parser.parse_args(argv)
    try:
        summary = select_sweep(args.sweep_dir, args.out, args.rules.split(",") if args.rules else None,
                               args.from_run, args.metric, args.n_boot, not args.no_wandb)
    except (SelectError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[select] headline rule {summary['headline']}; rules {summary['rules']}; {summary['tested']} "
          f"checkpoint(s) tested; {summary['files']['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.select"))
