"""Bad configuration: overrides a user types, values out of range, wrong types, typo'd names. Each goes
through `experiments.config.load_config` (what every CLI calls first); a few through the CLI itself.

A table, one row per case: (name, overrides, regex the message must contain, strings it must name).
`{tmp}` in an override is the case's temporary folder. Every key of the range table
(`experiments.config_checks.RANGES`) is probed just outside and on its bounds by tests/test_config_checks.py;
the rows here are the ones a user is likely to type.
"""
from __future__ import annotations

from tests.badinputs import ACCEPTED, bad_input, cli

OUT_OF_RANGE = [
    ("val_fraction_above_one", ["data.val_fraction=2"], r"must be in \[0, 1\)", ("data.val_fraction=2.0",)),
    ("fg_fraction_above_one", ["data.fg_fraction=1.5"], r"must be in \[0, 1\]", ("data.fg_fraction=1.5",)),
    ("std_zero", ["data.normalize=zscore", "data.std=0"], r"must be in \(0, inf\)", ("data.std=0.0",)),
    ("std_nan", ["data.std=.nan"], r"must be in \(0, inf\)", ("data.std=nan",)),
    ("target_spacing_zero", ["data.target_spacing=[1.5,0,5]"], r"every element must be in \(0, inf\); 0.0 is not",
     ("data.target_spacing",)),
    ("target_spacing_two_axes", ["data.target_spacing=[1.5,5]"], r"needs exactly 3 values", ("data.target_spacing",)),
    ("patch_size_zero", ["data.patch_size=[64,0,16]"], r"every element must be in \[1, inf\)", ("data.patch_size",)),
    ("batch_size_zero", ["data.batch_size=0"], r"must be in \[1, inf\)", ("data.batch_size=0",)),
    ("max_epochs_zero", ["trainer.max_epochs=0"], r"must be in \[1, inf\)", ("trainer.max_epochs=0",)),
    ("lr_negative", ["optim.lr=-0.001"], r"must be in \(0, inf\)", ("optim.lr",)),
    ("window_reversed", ["data.window=[300,-1000]"], r"low end must be below the high end", ("data.window",)),
    ("seed_negative", ["run.seed=-1"], r"must be in \[0, 4294967295\]", ("run.seed=-1",)),
    ("fewshot_fold_past_the_folds", ["fewshot.fold=5"], r"has 5 folds \(0\.\.4\)", ("fewshot.fold=5",)),
    ("class_value_unknown", ["evaluation.classes.lesion.values=[3,9]"], r"must be in \[0, 7\]; 9 is not",
     ("evaluation.classes.lesion.values",)),
]

MALFORMED = [
    ("batch_size_not_a_number", ["data.batch_size=abc"], r"could not be converted to Integer", ("data.batch_size",)),
    ("unknown_key", ["data.bacth_size=4"], r"unknown key data\.bacth_size; did you mean data\.batch_size\?; keys "
     r"under data: .*'batch_size'",
     ("data.bacth_size",)),
    ("unknown_top_level_key", ["optimizer.lr=0.1"], r"unknown key optimizer \(in optimizer\.lr\); did you mean optim\?; "
     r"keys under the top level: \[.*'optim'", ("optimizer",)),
    ("override_without_equals", ["data.batch_size"], r"is not of the form key=value", ("data.batch_size",)),
    ("override_with_empty_key", ["=4"], r"is not a dotted path", ("'=4'",)),
    ("scalar_for_a_list", ["data.sources=mosmed"], r"is a list; write data\.sources=\[mosmed\]", ("data.sources",)),
    ("unclosed_bracket", ["data.patch_size=[64,64,16"], r"is not valid YAML", ("data.patch_size",)),
    ("value_for_a_group", ["data=1"], r"is a group of settings, not one value", ("'data=1'",)),
    ("unset_environment_variable", ["paths.runs=${oc.env:COVID_DG_NO_SUCH_VARIABLE}"],
     r"Environment variable 'COVID_DG_NO_SUCH_VARIABLE' not found", ("paths.runs",)),
]

NAMES = [
    ("normalize_typo", ["data.normalize=zscorre"], r"must be one of \['minmax', 'zscore', 'none'\]", ("data.normalize",)),
    ("on_error_typo", ["data.on_error=ignore"], r"must be one of \['fail', 'skip'\]", ("data.on_error",)),
    ("harmonize_off_unknown_step", ["data.harmonize_off=[decoed]"], r"unknown step\(s\) \['decoed'\]",
     ("data.harmonize_off",)),
    ("selection_report_typo", ["selection.report=[last,orcale]"], r"unknown rule\(s\) \['orcale'\]", ("selection.report",)),
    ("source_typo", ["data.sources=[covid19_20,mosmd]"], r"unknown source\(s\) \['mosmd'\]", ("data.sources",)),
    ("policy_for_an_unknown_source", ["data.policies.ctsge=lung"], r"unknown source 'ctsge'", ("data.policies.ctsge",)),
    ("policy_unknown", ["data.policies.ctseg=lungs"], r"ctseg has the label policies \[.*'lung'",
     ("data.policies.ctseg='lungs'",)),
    ("policy_as_a_list", ["data.policies.mosmed=[lesion]"], r"mosmed has the label policies", ("data.policies.mosmed",)),
    ("image_flips_unknown_axis", ["data.image_flips.ctseg.radiopaedia_4_*=[L-R]"], r"unknown axis \['L-R'\]",
     ("data.image_flips.ctseg.radiopaedia_4_*",)),
    ("image_flips_unknown_source", ["data.image_flips.ctsge.coronacases_001=[A-P]"], r"unknown source 'ctsge'",
     ("data.image_flips.ctsge",)),
    ("custom_source_file_missing", ["data.custom_sources=[{tmp}/nope.yaml]"], r"unreadable custom source YAML",
     ("{tmp}/nope.yaml",)),
]


def _register(name: str, overrides: list[str], match: str, names: tuple[str, ...]) -> None:
    def run(tmp):
        from experiments.config import load_config

        return load_config([o.replace("{tmp}", str(tmp)) for o in overrides])

    run.__name__ = name
    bad_input("config", match=match, names=names)(run)


for _row in OUT_OF_RANGE + MALFORMED + NAMES:
    _register(*_row)


# Valid edge values: the checks must not refuse them.
@bad_input("config", match=ACCEPTED)
def case_edge_values_accepted(tmp):
    from experiments.config import load_config

    cfg = load_config(["data.val_fraction=0", "selection.method=last", "data.fg_fraction=1", "data.cache_workers=0",
                       "data.test_fraction=0", "inference.overlap=0", "data.window=[-1000,-999]", "run.seed=0",
                       "networks.unet.dropout=0", "data.normalize=zscore", "data.std=1e-3"])
    assert cfg.data.val_fraction == 0 and cfg.data.fg_fraction == 1 and cfg.data.window == [-1000.0, -999.0]


@bad_input("config", match=ACCEPTED)
def case_image_flip_glob_key_accepted(tmp):
    from experiments.config import load_config

    cfg = load_config(["data.image_flips.ctseg.radiopaedia_4_*=[A-P]", "data.policies.ctseg=lung"])
    assert list(cfg.data.image_flips.ctseg["radiopaedia_4_*"]) == ["A-P"]


@bad_input("config", match=ACCEPTED)
def case_every_preset_at_every_scale_accepted(tmp):
    from experiments.config import load_config, presets

    for preset in presets("preset"):
        for scale in ("default", *presets("experiment")):
            load_config([f"preset={preset}", f"experiment={scale}"])


@bad_input("config", match=ACCEPTED)
def case_custom_source_named_in_the_config_accepted(tmp):
    from experiments.config import load_config

    spec = tmp / "mine.yaml"
    spec.write_text("name: mine\nimages: 'images/*.nii.gz'\ncodes: {0: background, 1: lesion}\nannotated: [lesion]\n", encoding="utf-8")
    cfg = load_config([f"data.custom_sources=[{spec}]", "data.sources=[mosmed,mine]", "data.policies.mine=custom"])
    assert list(cfg.data.sources) == ["mosmed", "mine"]


# End to end: the message reaches the terminal of a user running the CLI.
@bad_input("config", match=r"(?s)exit 2: .*error: data\.std=0\.0: must be in \(0, inf\)", names=("data.std",))
def case_cli_loso_std_zero(tmp):
    cli("experiments.loso", "--holdout", "mosmed", "experiment=smoke", "data.std=0", f"paths.runs={tmp}",
        f"paths.cache={tmp}/cache")


@bad_input("config", match=r"(?s)exit 2: .*error: override 'data\.batch_size=\[2': the value of data\.batch_size is not valid YAML",
           names=("data.batch_size",))
def case_cli_transfer_unclosed_bracket(tmp):
    cli("experiments.transfer", "--train", "covid19_20", "experiment=smoke", "data.batch_size=[2",
        f"paths.runs={tmp}", f"paths.cache={tmp}/cache")


# A sweep's run process (what every backend executes) prints the same one line into the run's log.
@bad_input("config", match=r"(?s)exit 1: error: .*data\.val_fraction=2\.0: must be in \[0, 1\)",
           names=("data.val_fraction",))
def case_cli_sweep_run_val_fraction(tmp):
    # "exit 1: error:" in `match`: the log starts with the message, not with a traceback
    cli("experiments.sweep_run", "protocol=loso", "data.holdout=mosmed", "experiment=smoke", "data.val_fraction=2",
        f"paths.runs={tmp}", f"paths.cache={tmp}/cache")
