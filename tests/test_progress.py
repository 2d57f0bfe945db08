"""Time is never a surprise (issue 19): the plan block, the wall-time estimate and the per-epoch lines of a
run, driven through RunProgress's hooks with a fake trainer and a fake clock (no training)."""
from types import SimpleNamespace

import pytest
import torch

from experiments.progress import (
    RunProgress,
    StepClock,
    duration,
    epoch_line,
    minutes,
    plan_lines,
    schedule_of,
    validation_epochs,
)

ROWS = [{"role": "train", "source": "covid19_20", "cases": 5, "patients": 4},
        {"role": "val", "source": "covid19_20", "cases": 1, "patients": 1},
        {"role": "test", "source": "mosmed", "cases": 6, "patients": 6}]


def schedule(**kw):
    args = dict(kind="loso", name="mosmed-x", split_rows=ROWS, max_epochs=4, steps_per_epoch=10, val_every=2,
                has_val=True, batch_size=2, patch_size=[48, 48, 16], device="cpu", threads=2, precision="32-true",
                world_size=1, phantom=True, warmup=2, measure=5)
    return schedule_of(**{**args, **kw})


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_plan_block_lists_cases_steps_device_and_when_the_estimate_comes():
    text = "\n".join(plan_lines(schedule()))
    assert "PHANTOM" in text
    assert "covid19_20     5     1     0" in text and "mosmed         0     0     6" in text
    assert "4 epochs x 10 steps = 40 steps" in text and "2 pass(es)" in text
    assert "batch 2 patches of 48x48x16 voxels; device cpu (2 threads), precision 32-true" in text
    assert "estimated wall time: after 7 steps (2 warm-up, then 5 measured)" in text
    assert validation_epochs(100, 5, True) == list(range(4, 100, 5)) and validation_epochs(4, 2, False) == []


def test_estimate_is_steps_left_times_measured_step_plus_validations():
    now = FakeClock()
    clock = StepClock(total_steps=40, val_epochs=[1, 3], warmup=2, measure=5, max_measure_s=60.0, now=now)
    clock.begin(0)
    for i in range(7):
        now.t += 10.0 if i < 2 else 1.0    # slow warm-up steps are not measured
        assert clock.step() == (i == 6)
    assert clock.step_s() == pytest.approx(1.0)
    e = clock.estimate(7, -1)
    assert e["steps"] == [3, 7] and not e["val_measured"] and e["val_passes_left"] == 2
    assert e["wall_s"] == pytest.approx(25.0 + 33 * 1.0)
    clock.val_start()
    now.t += 6.0
    clock.val_end()
    assert clock.remaining_s(20, 1) == pytest.approx(20 * 1.0 + 1 * 6.0)  # one validation left (after epoch 3)


def test_measurement_also_ends_after_max_seconds():
    now = FakeClock()
    clock = StepClock(total_steps=100, val_epochs=[], warmup=1, measure=50, max_measure_s=20.0, now=now)
    clock.begin(0)
    ends = []
    for _ in range(5):
        now.t += 8.0
        ends.append(clock.step())
    assert ends == [False, False, False, True, False]  # steps 2-4 took 24 s >= 20 s


def fake_trainer(**kw):
    base = dict(is_global_zero=True, current_epoch=0, global_step=0, max_epochs=4, sanity_checking=False,
                callback_metrics={})
    return SimpleNamespace(**{**base, **kw})


def test_hooks_print_plan_estimate_and_one_line_per_epoch():
    """What a log file (no TTY) shows of a 4-epoch run with validation after epochs 2 and 4."""
    now, lines, saved = FakeClock(), [], []
    progress = RunProgress(lambda trainer: schedule(), warmup=2, measure=5, max_measure_s=60.0,
                           save=lambda s: saved.append(dict(s)), write=lines.append, now=now)
    trainer = fake_trainer()
    progress.on_train_start(trainer, None)
    assert lines[0].startswith("plan: loso run mosmed-x") and saved[-1]["estimate"] is None
    for epoch in range(4):
        trainer.current_epoch = epoch
        progress.on_train_epoch_start(trainer, None)
        for _ in range(10):
            now.t += 2.0
            trainer.global_step += 1
            progress.on_train_batch_end(trainer, None, None, None, 0)
        if epoch in (1, 3):
            progress.on_validation_start(trainer, None)
            now.t += 30.0
            trainer.callback_metrics = {"val/mean/dice": torch.tensor(0.25), "val/mosmed/dice": torch.tensor(0.5),
                                        "val/mean/dice/n": torch.tensor(3.0),
                                        "train/loss_epoch": torch.tensor(0.75)}
            progress.on_validation_end(trainer, None)
        progress.on_train_epoch_end(trainer, None)
    progress.on_train_end(trainer, None)
    estimates = [x for x in lines if x.startswith("estimated wall time: ~")]
    assert len(estimates) == 2
    assert "measured from steps 3-7: 2.00 s/step; validation not measured yet (2 pass(es) to come)" in estimates[0]
    # 14 s so far + 33 steps x 2 s = 80 s, validations not yet known
    assert estimates[0].startswith("estimated wall time: ~80 s")
    # after the first validation: 40 steps x 2 s + 2 x 30 s = 140 s (recorded below)
    assert estimates[1].startswith("estimated wall time: ~2 min") and "steps 3-20: 2.00 s/step; validation 30.0 s " \
        "per pass, 1 pass(es) left" in estimates[1]
    epochs = [x for x in lines if x.startswith("[epoch")]
    assert epochs[0] == "[epoch 1/4] step 10/40 elapsed 0:20 ETA 1:00"   # 30 steps x 2 s; validation not measured yet
    assert epochs[1] == "[epoch 2/4] step 20/40 train/loss_epoch=0.7500 val/mean/dice=0.2500 elapsed 1:10 ETA 1:10"
    assert epochs[2].startswith("[epoch 3/4] step 30/40 train/loss_epoch=0.7500 elapsed") and "val/" not in epochs[2]
    assert epochs[3].endswith("ETA 0:00")
    assert saved[-1]["actual"]["wall_s"] == pytest.approx(140.0) and saved[-1]["estimate"]["wall_s"] == 140.0


def test_other_ranks_print_nothing():
    lines = []
    progress = RunProgress(lambda trainer: schedule(), 2, 5, 60.0, write=lines.append, now=FakeClock())
    progress.on_train_start(fake_trainer(is_global_zero=False), None)
    assert lines == []


def test_durations_read_as_clock_and_estimates_as_minutes():
    assert duration(75) == "1:15" and duration(3725) == "1:02:05" and duration(None) == "?"
    assert minutes(40) == "~40 s" and minutes(720) == "~12 min" and minutes(6 * 3600) == "~6.0 h"
    assert epoch_line(0, 2, 5, 10, {}, False, 1.0, None) == "[epoch 1/2] step 5/10 elapsed 0:01 ETA ?"


def test_the_bar_counts_the_whole_runs_steps_across_epochs():
    from experiments.progress import RunProgressBar

    bar = RunProgressBar()
    trainer = fake_trainer(max_epochs=3, estimated_stepping_batches=30, progress_bar_metrics={}, loggers=[],
                           global_step=10, current_epoch=1)   # resumed after epoch 1
    bar._trainer = trainer
    bar.on_train_start(trainer)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (10, 30)
    for epoch in (1, 2):
        trainer.current_epoch = epoch
        bar.on_train_epoch_start(trainer)
        for i in range(10):
            trainer.global_step += 1
            bar.on_train_batch_end(trainer, None, None, None, i)
        assert bar.train_progress_bar.n == 10 * (epoch + 1)   # not reset per epoch
        bar.on_train_epoch_end(trainer, None)
    assert bar.train_progress_bar.desc.startswith("epoch 3/3") and bar.train_progress_bar.total == 30
    bar.on_train_end(trainer)
