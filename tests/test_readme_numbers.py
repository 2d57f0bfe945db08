"""`make readme-numbers` rewrites the marked tables from run results (fake results here: no training)."""
import json

import pytest

from tools import readme_numbers as rn

DOC = """# Title

Prose with 0.365 in it stays.

<!-- numbers:demo -->
| old | table |
|---|---|
| `make demo` | 0.1 |
<!-- /numbers:demo -->

Between.

<!-- numbers:transfer-smoke -->
| untouched |
<!-- /numbers:transfer-smoke -->
"""

METRICS = {"test/mosmed/dice": 0.36519, "test/mosmed/nsd": 0.3603, "test/mosmed/hd95": 138.43,
           "val/mean/dice": 0.66049, "data": "phantom"}


def fake_repo(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text(DOC, encoding="utf-8")
    (root / "docs" / "results.md").write_text(DOC.replace("# Title", "# Results"), encoding="utf-8")
    (root / "docs" / "other.md").write_text("# No blocks\n", encoding="utf-8")
    runs = tmp_path / "runs"
    run = runs / "loso" / "mosmed-demo-abcdef12"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(METRICS), encoding="utf-8")
    (run / "done").write_text("", encoding="utf-8")
    (runs / "loso" / "mosmed-demo-unfinished").mkdir()   # no `done`: ignored
    sweep = runs / "transfer-smoke"
    sweep.mkdir()
    (sweep / "transfer_matrix.md").write_text("**PHANTOM DATA**\n\n# Transfer matrix\n\nRows: ...\n\n"
                                              "| train \\ test | a |\n|---|---|\n| a | 0.5 |\n\n![x](x.png)\n", encoding="utf-8")
    return root, runs


def test_rewrite_replaces_only_the_block():
    new, n = rn.rewrite(DOC, "demo", "| new |\n")
    assert n == 1
    assert "| new |\n<!-- /numbers:demo -->" in new and "| old | table |" not in new
    assert "Prose with 0.365 in it stays." in new and "| untouched |" in new
    assert rn.rewrite(new, "demo", "| new |")[0] == new  # idempotent
    assert rn.rewrite(DOC, "smoke", "x")[1] == 0


def test_unbalanced_markers_are_an_error():
    with pytest.raises(ValueError, match="unbalanced"):
        rn.rewrite(DOC.replace("<!-- /numbers:demo -->\n", ""), "demo", "x")


def test_tables_from_fake_results(tmp_path):
    _, runs = fake_repo(tmp_path)
    row = rn.JOBS["demo"].table(runs, 93.4)
    assert row.splitlines()[2] == "| `make demo` | 93 s | 0.365 | 0.360 | 138 mm | 0.660 |"
    assert rn.JOBS["transfer-smoke"].table(runs, None) == "| train \\ test | a |\n|---|---|\n| a | 0.5 |\n"
    (runs / "loso" / "mosmed-demo-abcdef12" / "metrics.json").write_text(json.dumps({**METRICS, "data": "real"}), encoding="utf-8")
    with pytest.raises(RuntimeError, match="not phantom"):
        rn.JOBS["demo"].table(runs, 1.0)
    # the methods job reads the sweep of its own preset (methods-methods), not the smoke sweep's folder
    (runs / "methods-methods").mkdir()
    (runs / "methods-methods" / "methods_table.md").write_text("# Methods\n\n| held-out | erm |\n|---|---|\n| mosmed | 0.2 |\n",
                                                               encoding="utf-8")
    assert rn.JOBS["methods"].table(runs, None) == "| held-out | erm |\n|---|---|\n| mosmed | 0.2 |\n"
    assert rn.JOBS["methods"].argv(runs)[3:6] == ["methods", "--preset", "methods"]


def test_main_rewrites_readme_and_docs_with_a_stamp(tmp_path, capsys):
    root, runs = fake_repo(tmp_path)
    assert rn.main(["--only", "demo,transfer-smoke", "--dry-run", "--root", str(root)]) == 0
    assert (root / "README.md").read_text(encoding="utf-8") == DOC  # dry run: nothing written
    assert "rewrites: README.md, docs/results.md" in capsys.readouterr().out

    assert rn.main(["--only", "demo,transfer-smoke", "--reuse", str(runs), "--root", str(root)]) == 0
    for f in ("README.md", "docs/results.md"):
        text = (root / f).read_text(encoding="utf-8")
        assert "| `make demo` | n/a | 0.365 | 0.360 | 138 mm | 0.660 |" in text
        assert "| a | 0.5 |" in text and "| untouched |" not in text
        stamp = next(line for line in text.splitlines() if line.startswith("*PHANTOM DATA. `make demo`"))
        for lib in ("Python 3.", "torch ", "MONAI ", "pytorch-lightning ", "NumPy "):
            assert lib in stamp
        assert "wall time not measured" in stamp
    assert (root / "docs" / "other.md").read_text(encoding="utf-8") == "# No blocks\n"


def test_unknown_job_is_refused():
    with pytest.raises(SystemExit):
        rn.main(["--only", "nosuch", "--dry-run"])
    with pytest.raises(SystemExit):
        rn.main(["--only", "demo,smoke", "--reuse", "x", "--wall", "3"])


def test_reuse_with_a_measured_wall_time(tmp_path):
    root, runs = fake_repo(tmp_path)
    assert rn.main(["--only", "demo", "--reuse", str(runs), "--wall", "91.2", "--root", str(root)]) == 0
    text = (root / "README.md").read_text(encoding="utf-8")
    assert "| `make demo` | 91 s | 0.365 |" in text and ": 91 s wall;" in text


def test_demo_printout_block(tmp_path):
    _, runs = fake_repo(tmp_path)
    (name, render), = rn.JOBS["demo"].extra
    assert name == "demo-output"
    out = render(runs)
    assert out.startswith("```\nrun folder: runs/loso/mosmed-demo-abcdef12\n  test/mosmed/dice = 0.3652\n")
    assert "  val/mean/dice = 0.6605\n" in out and out.endswith("```\n")


def test_every_job_has_a_block_in_the_docs():
    for name in rn.JOBS:
        assert rn.files_with(name), f"no <!-- numbers:{name} --> block in README.md or docs/"
    for name, _ in rn.JOBS["demo"].extra:
        assert rn.files_with(name), name


def test_selection_table_from_the_select_csvs(tmp_path, capsys):
    """The hparams-methods block: one row per method from experiments.select's CSVs (mean ± SE over trials,
    the paired difference from erm, the last and oracle rules); a single trial has no SE."""
    sel = tmp_path / "runs" / "hparams_methods-methods" / "selection"
    sel.mkdir(parents=True)
    head = "method,mosmed,mean,mosmed_n_trials,mosmed_se\n"
    (sel / "table_training_domain.csv").write_text(head + "erm,0.2,0.2,2,0.01\ndsu,0.25,0.25,2,0.0304\n",
                                                   encoding="utf-8")
    (sel / "table_last.csv").write_text(head + "erm,0.15,0.15,1,nan\ndsu,0.1,0.1,2,0.02\n", encoding="utf-8")
    (sel / "table_oracle.csv").write_text(head + "erm,0.3,0.3,2,0.0\ndsu,0.31,0.31,2,0.0\n", encoding="utf-8")
    (sel / "paired_training_domain.csv").write_text(
        "method,holdout,mean_diff,ci_low,ci_high,p,n,n_boot,n_undefined\ndsu,mosmed,0.05,-0.0123,0.1,0.3125,6,2000,0\n"
        "dsu,ctseg,0.2,0.1,0.3,0.03,10,2000,0\ndsu,mean,0.1,0.0,0.2,0.04,16,2000,0\n",  # other held-out rows after it
        encoding="utf-8")
    lines = rn.JOBS["hparams-methods"].table(tmp_path / "runs", 10.0).splitlines()
    assert lines[2] == "| erm | 0.200 ± 0.010 | reference | 0.150 | 0.300 ± 0.000 |"
    assert lines[3] == "| dsu | 0.250 ± 0.030 | +0.050 [\u22120.012, +0.100], p 0.31, 6 | 0.100 ± 0.020 | 0.310 ± 0.000 |"

    assert rn.main(["--only", "hparams-methods", "--dry-run", "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "sweeps.launch hparams_methods --preset methods" in out
    assert f"&& {__import__('sys').executable} -m experiments.select {tmp_path / 'runs' / 'hparams_methods-methods'}" in out
