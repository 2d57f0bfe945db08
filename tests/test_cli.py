"""The `covid-dg` console script and what every entry point shares (rundir.cli): one-line errors with a
did-you-mean, `--debug`, the preflight checks, and the filter of third-party warnings (issue 19)."""
from __future__ import annotations

import configparser
import importlib.util
import logging
import re
import sys
import warnings
from pathlib import Path

import pytest

from experiments import cli
from experiments.config import load_config
from rundir import cli as rcli

REPO = Path(__file__).resolve().parents[1]


def test_setup_cfg_installs_the_console_script():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    assert scripts == ["covid-dg = experiments.cli:main"]
    module, func = scripts[0].split("=", 1)[1].strip().split(":")
    assert getattr(__import__(module, fromlist=[func]), func) is cli.main


def test_help_lists_every_command_once(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  ([a-z]\S*)  ", out.split("options:")[0], re.M)
    assert listed == list(cli.COMMANDS)
    for name in ("loso", "transfer", "fewshot", "train", "predict", "score", "evaluate", "verify", "audit",
                 "report", "select", "sweep", "list", "bench"):
        assert name in cli.COMMANDS
    assert cli.main([]) == 2  # no command: the list, and a usage error


def test_a_command_shows_its_own_help(capsys):
    assert cli.main(["loso", "--help"]) == 0  # argparse's SystemExit(0) from inside the command
    out = capsys.readouterr().out
    assert "--holdout" in out and "Leave-one-source-out" in out


def test_a_command_runs_its_module_with_its_arguments(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mosmed" in out and "mixstyle" in out


def test_a_commands_errors_name_it_as_typed(capsys):
    """`covid-dg loso` with a bad holdout says `covid-dg loso: error:`, not `python -m experiments.loso`, and the
    name does not stick to a later `python -m` style call."""
    assert cli.main(["loso", "--holdout", "mosmd", "experiment=smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("covid-dg loso: error: ") and "did you mean 'mosmed'?" in err[-1], err
    assert rcli.dispatched_as is None
    assert rcli.run_cli(lambda argv: (_ for _ in ()).throw(ValueError("bad")), "prog", []) == 2
    assert capsys.readouterr().err.startswith("prog: error: bad")


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_a_commands_usage_errors_and_help_name_it_as_typed(command, capsys, monkeypatch):
    """argparse's own usage lines and errors (an unknown flag) say `covid-dg COMMAND`, not `python -m MODULE`."""
    # pytest's assertion rewriter claims every module named test_*.py, experiments.test_run included, and
    # cannot hand runpy its code: out of the way for this call, with the module it may have loaded already
    # (runpy reuses an imported module's loader). Outside pytest there is no such hook.
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if type(f).__name__ != "AssertionRewritingHook"])
    monkeypatch.delitem(sys.modules, "experiments.test_run", raising=False)
    if command == "bench" and importlib.util.find_spec("benchmarks") is None:
        pytest.skip("benchmarks/ is not importable from here (an installed package without the checkout)")
    assert cli.main([command, "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert f"usage: covid-dg {command} " in err and f"covid-dg {command}: error: " in err, err
    assert "python -m" not in err, err
    assert cli.main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: covid-dg {command}")


def test_unknown_command_suggests_the_closest(capsys):
    assert cli.main(["lsoo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'lsoo'; did you mean 'loso'?" in err[0]


def test_a_command_is_dispatched_by_module_name(tmp_path, monkeypatch, capsys):
    """`select` is written elsewhere: the dispatcher names modules, so a module that appears later works,
    and one that is missing is one line, not a traceback."""
    (tmp_path / "hcli_probe_mod.py").write_text(
        "import sys\nprint('probe', sys.argv[1:])\nsys.exit(3)\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "probe", ("hcli_probe_mod", "a probe"))
    monkeypatch.setitem(cli.COMMANDS, "gone", ("hcli_no_such_module_xyz", "missing"))
    assert cli.main(["probe", "a", "--debug", "b"]) == 3
    assert "probe ['a', 'b', '--debug']" in capsys.readouterr().out  # --debug passed on to the command
    assert cli.main(["gone"]) == 2
    err = capsys.readouterr().err
    assert "needs the module hcli_no_such_module_xyz, which is not part of this installation" in err


# --- one-line config errors (issue 19, item 4): every message names the key, the allowed values, the fix

@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_epoch=3"], r"unknown key trainer\.max_epoch; did you mean trainer\.max_epochs\?; keys under "
                              r"trainer: \[.*'max_epochs'"),
    (["data.patch_size=64"], r"data\.patch_size is a list; write data\.patch_size=\[64,64,64\] \(3 values"),
    (["method=mixstyl"], r"method is a group of settings; did you mean method\.name=mixstyle\? \(methods "
                         r"configured: \[.*'erm'"),
    (["method.name=mixstyl"], r"method\.name='mixstyl' has no arguments under `methods`.*did you mean 'mixstyle'\?"),
    (["data.holdout=mosmd"], r"data\.holdout='mosmd': unknown source; did you mean 'mosmed'\?; known sources: "
                             r"\[.*'covid19_20'"),
    (["data.sources=[covid19_20,ctsge]"], r"unknown source\(s\) \['ctsge'\]; did you mean 'ctseg'\?"),
    (["experiment=smok"], r"experiment=smok: unknown experiment preset 'smok'; did you mean 'smoke'\?; "
                          r"available: \['demo', 'methods', 'smoke'\]"),
    (["preset=seed01"], r"preset=seed01: unknown protocol preset 'seed01'; did you mean 'seed001'\?"),
    (["optimizer.lr=1"], r"unknown key optimizer \(in optimizer\.lr\); did you mean optim\?"),
])
def test_config_errors_are_one_line_with_a_suggestion(overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        load_config(overrides)
    assert "\n" not in str(e.value)


def test_a_misspelled_source_gets_no_phantom_advice(capsys):
    """Item 6: `--holdout mosmd` once said 'no phantom profile ... set paths.data_root to real data'."""
    from experiments.loso import main

    with pytest.raises(SystemExit) as e:
        main(["--holdout", "mosmd"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # no usage block: the error names the key
    assert err[0].startswith("python -m experiments.loso: error: data.holdout='mosmd'")
    assert "did you mean 'mosmed'?" in err[0] and "phantom" not in err[0] and "data_root" not in err[0]


def test_debug_raises_instead_of_one_line(monkeypatch):
    from experiments.loso import main

    monkeypatch.setattr(rcli, "_debug", True)
    with pytest.raises(ValueError, match="did you mean 'mosmed'"):
        main(["--holdout", "mosmd"])


def test_run_cli_turns_user_errors_into_one_line_and_keeps_bugs(capsys, monkeypatch):
    monkeypatch.setattr(rcli, "_debug", False)

    def bad_input(argv):
        raise FileNotFoundError("paths.data_root=/nowhere is not a folder\nsecond line")

    assert rcli.run_cli(bad_input, "prog", []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prog: error: paths.data_root=/nowhere is not a folder  (--debug shows the traceback)"]
    with pytest.raises(FileNotFoundError):
        rcli.run_cli(bad_input, "prog", ["--debug"])

    class Busy(RuntimeError):
        pass

    assert rcli.run_cli(lambda argv: (_ for _ in ()).throw(Busy("in use")), "prog", [], errors={Busy: 1}) == 1
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        rcli.run_cli(lambda argv: 1 / 0, "prog", [])
    assert rcli.run_cli(lambda argv: {"a": 1}, "prog", []) == 0
    assert rcli.run_cli(lambda argv: argv, "prog", ["x", "--debug"]) == 0


# --- preflight: settings that cannot work stop before any data is read (item 5)

def preflight(overrides):
    from experiments.build import validate_config

    validate_config(load_config(overrides))


def test_no_validation_epoch_under_a_validation_selection_is_refused_before_training():
    with pytest.raises(ValueError, match=r"trainer\.max_epochs=1 < trainer\.check_val_every_n_epoch=4: no epoch "
                                         r"would validate.*\['training_domain'\].*check_val_every_n_epoch=1"):
        preflight(["experiment=smoke", "trainer.max_epochs=1"])
    with pytest.raises(ValueError, match=r"\['oracle'\]"):  # a reported rule needs validation too
        preflight(["experiment=smoke", "trainer.max_epochs=1", "selection.method=last", "selection.report=[oracle]"])
    preflight(["experiment=smoke", "trainer.max_epochs=1", "selection.method=last", "selection.report=[]"])
    preflight(["experiment=smoke", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1"])


def test_the_preflight_stops_the_command_before_any_data(tmp_path, capsys):
    """Item 5: `trainer.max_epochs=1` with the smoke preset trained, then crashed; now one line, exit 2, and
    nothing written (no phantom suite, no run folder)."""
    from experiments.loso import main

    argv = ["--holdout", "mosmed", "experiment=smoke", "trainer.max_epochs=1", f"paths.runs={tmp_path / 'runs'}",
            f"paths.cache={tmp_path / 'cache'}", "wandb.mode=disabled"]
    with pytest.raises(ValueError, match="no epoch would validate"):
        main(argv)
    assert rcli.run_cli(main, "python -m experiments.loso", argv) == 2
    assert "no epoch would validate" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not any((tmp_path / "runs").rglob("config.yaml"))


def test_training_domain_selection_without_validation_patients_is_refused():
    with pytest.raises(ValueError, match=r"data\.val_fraction=0 leaves no validation patients"):
        preflight(["data.val_fraction=0"])
    preflight(["data.val_fraction=0", "selection.method=last"])


def test_fewshot_with_a_validation_selection_is_refused_before_data():
    from experiments.protocols import PROTOCOLS

    cfg = load_config(["preset=seed003_task1", "selection.method=training_domain"])
    with pytest.raises(ValueError, match=r"validates on none, but selection \['training_domain'\].*selection\.method=last"):
        PROTOCOLS.lookup("fewshot")(cfg)
    assert PROTOCOLS.lookup("fewshot")(load_config(["preset=seed003_task1"])).kind == "fewshot"


def test_a_known_source_without_a_phantom_profile_says_so(tmp_path, monkeypatch):
    from experiments import build
    from experiments.build import resolve_data_root

    monkeypatch.setattr(build, "PHANTOM_SOURCES", tuple(s for s in build.PHANTOM_SOURCES if s != "nsclc"))
    cfg = load_config(["data.sources=[mosmed,nsclc]", f"paths.cache={tmp_path}"])
    with pytest.raises(ValueError, match=r"paths\.data_root is unset.*\['nsclc'\] have no phantom profile"):
        resolve_data_root(cfg)


# --- third-party warnings (item 12)

def test_third_party_warnings_are_hidden_and_ours_still_show(capsys):
    rcli.quiet_third_party_warnings()
    handler_out = []

    class Keep(logging.Handler):
        def emit(self, record):
            handler_out.append(record.getMessage())

    pl_logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    keep = Keep()
    pl_logger.addHandler(keep)
    old_level = pl_logger.level
    pl_logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            rcli.quiet_third_party_warnings()  # after the reset above, as at an entry point's start
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) "
                          "and treespec.is_leaf()` instead.", FutureWarning, stacklevel=2)
            for hook in ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer"):
                warnings.warn(f"You have overridden `{hook}` in `LightningModule` but have passed in a "
                              "`LightningDataModule`. It will use the implementation from `LightningModule` instance.",
                              UserWarning, stacklevel=2)
            warnings.warn("You have overridden `on_before_batch_transfer` in `LightningDataModule`.",
                          UserWarning, stacklevel=2)  # not the text filtered: stays
            warnings.warn("selection is degenerate: every validation score is 0.0", UserWarning, stacklevel=2)  # ours
            pl_logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing "
                           "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger")
            pl_logger.info("GPU available: False, used: False")
    finally:
        pl_logger.removeHandler(keep)
        pl_logger.setLevel(old_level)
    assert [str(w.message) for w in caught] == [
        "You have overridden `on_before_batch_transfer` in `LightningDataModule`.",
        "selection is degenerate: every validation score is 0.0"]
    assert handler_out == ["GPU available: False, used: False"]


def test_the_wandb_logger_passes_no_anonymous_setting(tmp_path):
    """wandb warns on every run that `anonymous` has no effect: Lightning passed None for it."""
    from experiments.tracking import make_wandb_logger

    cfg = load_config(["wandb.mode=offline"])
    logger = make_wandb_logger(cfg, tmp_path, "r", "loso", [])
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == cfg.wandb.project


def test_every_entry_point_goes_through_run_cli():
    """`--debug` and the one-line errors on every `python -m` entry point (rundir.cli.run_cli)."""
    for name, (module, _) in cli.COMMANDS.items():
        path = REPO / (module.replace(".", "/") + ".py")
        if not path.exists():  # `select` is being written elsewhere
            continue
        text = path.read_text(encoding="utf-8")
        main_block = text[text.index('if __name__ == "__main__":'):]
        assert "run_cli(" in main_block, f"{module} ({name}) does not start through rundir.cli.run_cli"


def test_python_dash_m_still_works_and_debug_is_accepted():
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "experiments.loso", "--holdout", "mosmd", "--debug"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "did you mean 'mosmed'" in proc.stderr


# --- data errors (item 7): every bad file, once, and what to do about them

def test_every_truncated_file_is_named_once_with_the_way_out(tmp_path, capsys):
    from datamodules.datamodule import DataError, MultiSourceDataModule
    from datamodules.harmonize import HarmonizerConfig
    from tests.badinputs.verify_eval import mosmed_tree

    for i in range(5):
        root, image, _ = mosmed_tree(tmp_path, study=f"study_{255 + i:04d}")
        if i in (1, 3):  # two truncated scans: fingerprinting meets the first, harmonizing both
            data = image.read_bytes()
            image.write_bytes(data[: len(data) // 2])
    dm = MultiSourceDataModule(root, tmp_path / "cache", ["mosmed"], train_sources=["mosmed"], test_sources=["mosmed"],
                               harmonizer=HarmonizerConfig(target_spacing=(8.0, 8.0, 10.0)), patch_size=(16, 16, 8),
                               val_fraction=0.0, find_duplicates=True)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    lines = str(err.value).splitlines()
    assert lines[0] == "2 problem(s) in the input data:"
    for path in (str(root / "mosmed/COVID19_1110/studies/CT-1/study_0256.nii.gz"),
                 str(root / "mosmed/COVID19_1110/studies/CT-1/study_0258.nii.gz")):
        assert sum(path in line for line in lines) == 1, (path, lines)
    assert f"covid-dg verify --root {root}" in lines[-1] and "data.on_error=skip" in lines[-1]
    assert len(lines) == 4  # summary, two files, the way out
    # at the command line: the whole list, not its first line, and no traceback
    assert rcli.run_cli(lambda argv: dm.prepare_data(), "prog", []) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    start = next(i for i, line in enumerate(err_lines) if line.startswith("prog: error:"))  # after progress bars
    assert err_lines[start:] == ["prog: error: " + lines[0], *lines[1:-1], lines[-1] + "  (--debug shows the traceback)"]


def test_an_entry_points_own_error_class_keeps_its_exit_status(capsys):
    class InUse(ValueError):  # a ValueError subclass with its own status: the entry point's mapping wins
        pass

    def main(argv):
        raise InUse("run folder x in use by pid 1")

    assert rcli.run_cli(main, "prog", [], errors={InUse: 1}) == 1
    assert "prog: error: run folder x in use by pid 1" in capsys.readouterr().err


def test_log_lines_read_as_a_user_reads_them():
    """INFO records print as their message (Lightning's "GPU available: ..."); warnings keep level and logger."""
    fmt = rcli.PlainFormatter()
    info = logging.LogRecord("pytorch_lightning.utilities.rank_zero", logging.INFO, "f", 1,
                             "GPU available: %s, used: %s", (False, False), None)
    warn = logging.LogRecord("datamodules.sources.msd_lung", logging.WARNING, "f", 1, "%s missing", ("dataset.json",), None)
    assert fmt.format(info) == "GPU available: False, used: False"
    assert fmt.format(warn) == "WARNING: datamodules.sources.msd_lung: dataset.json missing"
