"""Bad inputs around a run folder: names that try to leave `paths.runs`, overwrites of folders that are not
runs, damaged or crafted checkpoints, a folder another process holds. No training here (tests/test_resume.py
kills and resumes real runs); every case is a config or a file a user, a shared runs folder or a disk hands us.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.badinputs import ACCEPTED, REPO, bad_input, cli


def _run(tmp: Path, *overrides: str):
    """experiments.runner.run for a LOSO run of the smoke preset with `overrides`, runs under tmp/runs."""
    from experiments.config import load_config
    from experiments.runner import run

    cfg = load_config(["experiment=smoke", f"paths.runs={tmp / 'runs'}", f"paths.cache={tmp / 'cache'}",
                       "data.holdout=mosmed", "wandb.mode=disabled", *overrides])
    return run(cfg, "loso", {"holdout": "mosmed"}, "mosmed")


def _survives(path: Path, fn):
    """Run `fn`; whatever it raises, `path` must still exist (nothing outside the run was deleted)."""
    try:
        return fn()
    finally:
        assert path.exists(), f"{path} was deleted"


@bad_input("run", match=r"run.name='\.\.' would be the parent folder itself, or above it", names=("run.name",))
def case_name_dotdot(tmp):
    _run(tmp, "run.name=..", "run.overwrite=true")


@bad_input("run", match=r"run.name='\.' would be the parent folder itself", names=("run.name",))
def case_name_dot_would_wipe_every_loso_run(tmp):
    other = tmp / "runs" / "loso" / "mosmed-smoke-0123abcd"
    other.mkdir(parents=True)
    _survives(other, lambda: _run(tmp, "run.name=.", "run.overwrite=true"))


@bad_input("run", match=r"run.name='\.\./\.\./\.\.' holds a path separator: it must be a single folder name",
           names=("run.name",))
def case_name_climbs_out_of_paths_runs(tmp):
    victim = tmp / "precious"
    victim.mkdir()
    _survives(victim, lambda: _run(tmp, "run.name=../../..", "run.overwrite=true"))


@bad_input("run", match=r"run.name='a/b' holds a path separator", names=("run.name",))
def case_name_with_a_slash(tmp):
    _run(tmp, "run.name=a/b")


@bad_input("run", match=r"run.name='/tmp/x' holds a path separator", names=("run.name",))
def case_name_absolute(tmp):
    _run(tmp, "run.name=/tmp/x")


@bad_input("run", match=r"run.name='\.hidden' starts with '\.'", names=("run.name",))
def case_name_hidden(tmp):
    _run(tmp, "run.name=.hidden")


@bad_input("run", match=r"run.name='aaa+' is longer than 200 bytes", names=("run.name",))
def case_name_too_long(tmp):
    _run(tmp, f"run.name={'a' * 300}")


@bad_input("run", match=r"run.name='link': the run folder .* resolves to .*, outside paths.runs",
           names=("run.name",))
def case_name_is_a_symlink_out_of_paths_runs(tmp):
    outside = tmp / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine", encoding="utf-8")
    (tmp / "runs" / "loso").mkdir(parents=True)
    (tmp / "runs" / "loso" / "link").symlink_to(outside)
    _survives(outside / "keep.txt", lambda: _run(tmp, "run.name=link", "run.overwrite=true"))


@bad_input("run", match=r"run.overwrite=true: .* is not a run folder .*refusing to delete it",
           names=("{tmp}/runs/loso/mine",))
def case_overwrite_of_a_folder_that_is_not_a_run(tmp):
    folder = tmp / "runs" / "loso" / "mine"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not a run", encoding="utf-8")
    _survives(folder / "notes.txt", lambda: _run(tmp, "run.name=mine", "run.overwrite=true"))


@bad_input("run", match=r"run folder .* in use by pid \d+", names=("{tmp}/runs/loso/busy",))
def case_second_process_on_a_locked_run_folder(tmp):
    hold = ("import sys,time; from datamodules.locking import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp / "runs" / "loso" / "busy")], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _run(tmp, "run.name=busy")
    finally:
        holder.kill()
        holder.wait()


@bad_input("run", match=r"sweep name='\.\./escape-smoke' holds a path separator", names=("sweep name",))
def case_sweep_name_with_a_path(tmp):
    from sweeps.launch import sweep_runs

    sweep_runs({"name": "../escape", "parameters": {}}, "smoke", tmp / "runs", [])


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what a crafted checkpoint would do with os.system
        return (Path.touch, (self.marker,))


def _crafted(path: Path) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "global_step": 2, "callbacks": {"x": _Payload(path.parent / "PWNED")}}, path)
    return path


def _module():
    import torch

    return torch.nn.Linear(3, 2)


def _training_checkpoint(path: Path, module) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "global_step": 4, "state_dict": module.state_dict(),
                "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 1}}}}}, path)
    return path


def _resume(folder: Path):
    from experiments.checkpoints import resume_point

    said = []
    return resume_point(folder, _module(), said.append), "\n".join(said)


@bad_input("run", match=ACCEPTED)
def case_crafted_last_checkpoint_is_moved_aside_never_run(tmp):
    ckpts = tmp / "checkpoints"
    _crafted(ckpts / "last.ckpt")
    (path, epochs, _note), said = _resume(ckpts)
    assert (path, epochs) == (None, 0) and not (ckpts / "PWNED").exists()
    assert "refused to load" in said and list(ckpts.glob("last.ckpt.corrupt-*"))


@bad_input("run", match=ACCEPTED)
def case_truncated_last_checkpoint_falls_back_to_the_previous(tmp):
    ckpts = tmp / "checkpoints"
    _training_checkpoint(ckpts / "last-prev.ckpt", _module())
    good = _training_checkpoint(ckpts / "last.ckpt", _module())
    good.write_bytes(good.read_bytes()[:300])
    (path, epochs, _note), said = _resume(ckpts)
    assert path == ckpts / "last-prev.ckpt" and epochs == 1
    assert f"cannot resume from {ckpts / 'last.ckpt'}: unreadable or truncated" in said
    assert not (ckpts / "last.ckpt").exists() and list(ckpts.glob("last.ckpt.corrupt-*"))


@bad_input("run", match=ACCEPTED)
def case_zero_byte_last_checkpoint_starts_clean(tmp):
    ckpts = tmp / "checkpoints"
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_bytes(b"")
    (path, epochs, _note), said = _resume(ckpts)
    assert (path, epochs) == (None, 0) and "unreadable or truncated" in said and "moved aside" in said


@bad_input("run", match=ACCEPTED)
def case_checkpoint_of_another_configuration_is_moved_aside(tmp):
    import torch

    ckpts = tmp / "checkpoints"
    _training_checkpoint(ckpts / "last.ckpt", torch.nn.Linear(5, 2))  # another network's shapes
    (path, epochs, _note), said = _resume(ckpts)
    assert path is None and "weights of another model" in said and "other shapes" in said


@bad_input("run", match=r"refused to load: it holds objects a checkpoint never contains",
           names=("{tmp}/checkpoints/best-epoch003.ckpt",))
def case_crafted_best_checkpoint_read_by_the_selection(tmp):
    from experiments.stages.test import progress_of as _progress_of

    ckpt = _crafted(tmp / "checkpoints" / "best-epoch003.ckpt")
    _survives(ckpt, lambda: _progress_of(str(ckpt)))
    assert not (ckpt.parent / "PWNED").exists()


@bad_input("run", match=r"exit 2: error: .* refused to load", names=("{tmp}/shared/best.ckpt",))
def case_crafted_checkpoint_given_to_predict(tmp):
    ckpt = _crafted(tmp / "shared" / "best.ckpt")
    try:
        cli("experiments.predict", "--ckpt", str(ckpt), "--input", str(tmp), "--out", str(tmp / "out"))
    finally:
        assert not (ckpt.parent / "PWNED").exists()


@bad_input("run", match=r"exit 2: error: .*unreadable or truncated checkpoint", names=("{tmp}/model.ckpt",))
def case_text_file_given_to_predict_as_checkpoint(tmp):
    (tmp / "model.ckpt").write_text("these are not weights\n", encoding="utf-8")
    cli("experiments.predict", "--ckpt", str(tmp / "model.ckpt"), "--input", str(tmp), "--out", str(tmp / "out"))


@bad_input("run", match=r"error: .* refused to load", names=("{tmp}/elsewhere/best.ckpt",), error=SystemExit)
def case_run_json_naming_a_crafted_checkpoint_for_test_run(tmp):
    import json

    from experiments import test_run

    ckpt = _crafted(tmp / "elsewhere" / "best.ckpt")
    run_dir = tmp / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("experiment: smoke\n", encoding="utf-8")
    (run_dir / "run.json").write_text(json.dumps({"selection": {"method": "training_domain", "checkpoints": {
        "training_domain": {"path": str(ckpt)}}}, "split_args": {}}), encoding="utf-8")
    try:
        test_run.main([str(run_dir), "--out", str(tmp / "t")])
    finally:
        assert not (ckpt.parent / "PWNED").exists()
