"""The `--help` epilog of the experiment commands (loso, transfer, fewshot): every scale preset with its
epochs x steps and its wall time on a CPU (measured, or for the full size estimated from the measured time
per step), so a newcomer sees the 6-hour job before starting it. Numbers live in configs/scale_times.yaml."""
from __future__ import annotations

from omegaconf import OmegaConf

from experiments.config import CONFIG_DIR, presets

TIMES = CONFIG_DIR / "scale_times.yaml"


def scale(name: str) -> dict:
    """epochs, steps per epoch, validation passes and patch size of scale preset `name` (base.yaml merged
    with experiment/<name>.yaml; `default` is base.yaml alone). Plain YAML: --help validates nothing."""
    cfg = OmegaConf.load(CONFIG_DIR / "base.yaml")
    if name != "default":
        cfg = OmegaConf.merge(cfg, OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml"))
    t, d = cfg.trainer, cfg.data
    return {"epochs": int(t.max_epochs), "steps": int(d.samples_per_epoch) // int(d.batch_size),
            "val_passes": int(t.max_epochs) // int(t.check_val_every_n_epoch),
            "patch": "x".join(str(p) for p in d.patch_size)}


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def wall_time(name: str, s: dict, times: dict) -> str:
    """`measured 2 min (...)`, `estimated ~6.1 h (...)` or `not measured`, from scale_times.yaml's entry."""
    entry = (times.get("presets") or {}).get(name) or {}
    where = f", {entry['conditions']}" if entry.get("conditions") else ""
    if entry.get("measured_s"):
        return f"measured {human(float(entry['measured_s']))} on {times.get('machine', 'CPU')}{where}"
    if entry.get("step_s"):
        total = s["epochs"] * s["steps"] * float(entry["step_s"]) + s["val_passes"] * float(entry.get("val_pass_s") or 0)
        return (f"estimated ~{human(total)} on {times.get('machine', 'CPU')} ({float(entry['step_s']):.2f} s/step"
                + (f" + {float(entry['val_pass_s']):.0f} s per validation" if entry.get("val_pass_s") else "")
                + f" measured{where}); use a GPU")
    return "wall time not measured"


def preset_epilog() -> str:
    """The epilog: scale presets with their size and time, then the protocol presets."""
    times = OmegaConf.to_container(OmegaConf.load(TIMES)) if TIMES.exists() else {}
    names = sorted({"default", *presets()}, key=lambda n: (lambda s: s["epochs"] * s["steps"])(scale(n)))  # small first
    rows = []
    for name in names:
        s = scale(name)
        size = f"{s['epochs']} epochs x {s['steps']} steps = {s['epochs'] * s['steps']} steps, patch {s['patch']}"
        rows.append(f"  {name:<8} {size}: {wall_time(name, s, times)}")
    return ("scale presets (experiment=NAME; no experiment= runs `default`, the full size):\n" + "\n".join(rows)
            + "\n  every run prints its plan and, after its first steps, its estimated wall time\n"
            + f"protocol presets (preset=NAME): {', '.join(presets('preset'))}")
