"""`--help` shows the scale presets with their size and wall time (issue 19), from configs/scale_times.yaml."""
import pytest
import yaml

from experiments import scale_help


def test_epilog_lists_every_scale_with_steps_and_measured_or_estimated_time(tmp_path, monkeypatch):
    times = tmp_path / "scale_times.yaml"
    times.write_text(yaml.safe_dump({"machine": "2 CPU cores", "presets": {
        "smoke": {"measured_s": 150, "conditions": "shared"}, "demo": {"measured_s": None},
        "default": {"step_s": 1.5, "val_pass_s": 60, "conditions": "phantom"}}}), encoding="utf-8")
    monkeypatch.setattr(scale_help, "TIMES", times)
    text = scale_help.preset_epilog()
    lines = text.splitlines()
    rows = {line.split()[0]: line for line in lines[1:] if line.startswith("  ") and "epochs x" in line}
    # smallest first: smoke (256 steps), demo (384), methods (512), default (12500)
    assert list(rows) == ["smoke", "demo", "methods", "default"]
    assert rows["smoke"] == "  smoke    16 epochs x 16 steps = 256 steps, patch 48x48x16: measured 2 min on 2 CPU cores, shared"
    assert rows["demo"].startswith("  demo     12 epochs x 32 steps = 384 steps") and rows["demo"].endswith("not measured")
    assert rows["methods"].startswith("  methods  64 epochs x 8 steps = 512 steps, patch 32x32x16")
    assert rows["methods"].endswith("not measured")  # absent from the times file given here
    # 100 x 125 steps x 1.5 s + 20 validations x 60 s = 19,950 s
    assert rows["default"].startswith("  default  100 epochs x 125 steps = 12500 steps, patch 128x128x32: estimated ~5.5 h")
    assert "1.50 s/step + 60 s per validation measured, phantom); use a GPU" in rows["default"]
    assert "seed004" in lines[-1]


@pytest.mark.parametrize("module", ["loso", "transfer", "fewshot"])
def test_each_experiment_command_shows_it(module, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"experiments.{module}").main(["--help"])
    out = capsys.readouterr().out
    assert "smoke    16 epochs x 16 steps" in out and "default  100 epochs x 125 steps" in out
