"""What a run will cost, said before it trains, and where it is while it trains (issue 19).

- The plan block (`schedule_of` -> `plan_lines`), printed when training starts: cases per source and role,
  epochs x steps per epoch, validation passes, device, precision, batch and patch size, and when the
  wall-time estimate will come.
- The estimate (`StepClock`): after `warmup` steps, the mean time of the next `measure` steps (or of the steps
  of the first `max_measure_s` seconds) times the steps left, plus the validation passes left times the
  first passes' mean once one has run; printed once measured and again after the first validation.
- One line per epoch (`RunProgress.on_train_epoch_end`): `[epoch i/N] step s/S loss, val dice, elapsed, ETA`;
  readable in a log file, where Lightning's bar is off.
- `RunProgressBar`: Lightning's TQDM bar counting the steps of the whole run, so its ETA is the run's.

The schedule and its estimates go to `<run>/schedule.json` as they are known, and into run.json at the end.
The numbers live in `trainer.progress` of base.yaml (Lightning needs none of them).
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

from evaluation.selection_rules import epoch_number


def duration(seconds: float | None) -> str:
    """`1:02:03`, `4:05` or `?`: elapsed and remaining times in a log line."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def minutes(seconds: float) -> str:
    """`~40 s`, `~12 min` or `~6.3 h`: a wall-time estimate."""
    if seconds < 90:
        return f"~{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"~{round(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"


def validation_epochs(max_epochs: int, every: int, has_val: bool, first_epoch: int = 0) -> list[int]:
    """The 0-based epochs from `first_epoch` on after which Lightning validates (check_val_every_n_epoch)."""
    if not has_val or every <= 0:
        return []
    return [e for e in range(first_epoch, max_epochs) if (e + 1) % every == 0]


def schedule_of(*, kind: str, name: str, split_rows: list[dict], max_epochs: int, steps_per_epoch: int,
                val_every: int, has_val: bool, batch_size: int, patch_size: list[int], device: str, threads: int,
                precision: str, world_size: int, phantom: bool, warmup: int, measure: int) -> dict:
    """The plan of one run's training as a JSON-able dict (schedule.json; run.json's `schedule`)."""
    per_source: dict[str, dict[str, int]] = {}
    for row in split_rows:
        per_source.setdefault(row["source"], {})[row["role"]] = int(row["cases"])
    passes = len(validation_epochs(max_epochs, val_every, has_val))
    return {"kind": kind, "name": name, "data": "phantom" if phantom else "real", "cases": per_source,
            "max_epochs": int(max_epochs), "steps_per_epoch": int(steps_per_epoch),
            "total_steps": int(max_epochs * steps_per_epoch), "val_every": int(val_every), "val_passes": passes,
            "batch_size": int(batch_size), "patch_size": list(patch_size), "device": device, "threads": int(threads),
            "precision": str(precision), "world_size": int(world_size), "warmup_steps": int(warmup),
            "measure_steps": int(measure), "estimate": None}


def plan_lines(s: dict) -> list[str]:
    """The plan block: what `schedule_of` holds, in words."""
    roles = ("train", "val", "test")
    width = max([len("source")] + [len(src) for src in s["cases"]])
    lines = [f"plan: {s['kind']} run {s['name']}" + (" (PHANTOM data)" if s["data"] == "phantom" else ""),
             f"  {'source':<{width}} " + " ".join(f"{r:>5}" for r in roles)]
    for src, counts in sorted(s["cases"].items()):
        lines.append(f"  {src:<{width}} " + " ".join(f"{counts.get(r, 0):>5}" for r in roles))
    val = (f"validation after every {s['val_every']} epoch(s): {s['val_passes']} pass(es)" if s["val_passes"]
           else "no validation")
    lines += [f"  training: {s['max_epochs']} epochs x {s['steps_per_epoch']} steps = {s['total_steps']} steps; {val}",
              f"  batch {s['batch_size']} patches of {'x'.join(str(p) for p in s['patch_size'])} voxels; device "
              f"{s['device']}" + (f" ({s['threads']} threads)" if s["device"] == "cpu" else "")
              + f", precision {s['precision']}" + (f", {s['world_size']} processes" if s["world_size"] > 1 else ""),
              f"  estimated wall time: after {s['warmup_steps'] + s['measure_steps']} steps "
              f"({s['warmup_steps']} warm-up, then {s['measure_steps']} measured)"]
    return lines


@dataclass
class StepClock:
    """Step and validation times of a run, from which the time left is estimated. Times come from `now`
    (time.monotonic; a test passes its own). Step durations exclude validation: the clock restarts at each
    epoch's start and after each validation."""
    total_steps: int
    val_epochs: list[int]          # 0-based epochs still to validate after
    warmup: int
    measure: int
    max_measure_s: float
    now: Callable[[], float] = time.monotonic
    start: float = 0.0
    first_step: int = 0            # the global step training (re)started from
    steps: list[float] = field(default_factory=list)
    vals: list[float] = field(default_factory=list)
    _last: float | None = None
    _val_start: float | None = None
    measured_at: int | None = None  # steps taken when the measurement ended

    def begin(self, global_step: int) -> None:
        self.start = self._last = self.now()
        self.first_step = global_step

    def step(self) -> bool:
        """A training step ended; True when this step completes the measurement (time to print)."""
        t = self.now()
        self.steps.append(t - (self._last if self._last is not None else t))
        self._last = t
        if self.measured_at is None:
            window = self.steps[self.warmup:]
            if window and (len(window) >= self.measure or sum(window) >= self.max_measure_s):
                self.measured_at = len(self.steps)
                return True
        return False

    def epoch_start(self) -> None:
        self._last = self.now()

    def val_start(self) -> None:
        self._val_start = self.now()

    def val_end(self) -> None:
        if self._val_start is not None:
            self.vals.append(self.now() - self._val_start)
        self._val_start = None
        self._last = self.now()

    def step_s(self) -> float | None:
        window = self.steps[self.warmup:self.measured_at] if self.measured_at else self.steps[self.warmup:]
        later = self.steps[self.measured_at:] if self.measured_at else []
        use = window + later  # every step after the warm-up: the estimate sharpens as the run goes
        return sum(use) / len(use) if use else None

    def val_s(self) -> float | None:
        return sum(self.vals) / len(self.vals) if self.vals else None

    def remaining_s(self, global_step: int, epoch_done: int) -> float | None:
        """Seconds left: steps left x mean step, plus validations left (after epochs > `epoch_done`, the last
        finished 0-based epoch) x mean validation when one was measured; None before any step time."""
        step = self.step_s()
        if step is None:
            return None
        left = max(0, self.total_steps - global_step) * step
        vals_left = sum(e > epoch_done for e in self.val_epochs)
        if vals_left and self.val_s() is not None:
            left += vals_left * self.val_s()
        return left

    def estimate(self, global_step: int, epoch_done: int) -> dict:
        """The estimate as recorded: total wall time of training and validation, and what it rests on."""
        first = self.first_step + self.warmup + 1
        last = self.first_step + len(self.steps)  # every step after the warm-up enters step_s
        remaining = self.remaining_s(global_step, epoch_done)
        elapsed = self.now() - self.start
        return {"wall_s": None if remaining is None else round(elapsed + remaining, 1),
                "elapsed_s": round(elapsed, 1), "step_s": self.step_s(), "steps": [first, last],
                "val_s": self.val_s(), "val_passes_left": sum(e > epoch_done for e in self.val_epochs),
                "val_measured": self.val_s() is not None}


def estimate_line(e: dict) -> str:
    """`estimated wall time: ~X min (measured from steps a-b ...)`."""
    val = (f"; validation {e['val_s']:.1f} s per pass, {e['val_passes_left']} pass(es) left" if e["val_measured"]
           else f"; validation not measured yet ({e['val_passes_left']} pass(es) to come)" if e["val_passes_left"]
           else "")
    return (f"estimated wall time: {minutes(e['wall_s'])} for training (measured from steps {e['steps'][0]}-"
            f"{e['steps'][1]}: {e['step_s']:.2f} s/step{val}; testing comes after)")


def epoch_line(epoch: int, max_epochs: int, step: int, total_steps: int, metrics: dict, validated: bool,
               elapsed: float, remaining: float | None) -> str:
    """One epoch's line: `[epoch i/N] step s/S train/loss_epoch=... val/...dice=... elapsed m:ss ETA m:ss`."""
    parts = [f"{k}={float(v):.4f}" for k, v in sorted(metrics.items())
             if k == "train/loss_epoch" or (validated and k.startswith("val/mean/dice")
                                            and not k.endswith(("/n", "/n_undefined")))]  # counts, sources: metrics.json
    return (f"[epoch {epoch_number(epoch)}/{max_epochs}] step {step}/{total_steps} " + " ".join(parts)
            + f" elapsed {duration(elapsed)} ETA {duration(remaining)}").replace("  ", " ")


class RunProgress(pl.Callback):
    """The plan block when training starts, the wall-time estimate once measured (and after the first
    validation), and one line per epoch. Rank zero prints; `write` is where lines go (print, or the bar's
    `write` so they do not break it); `save` gets the schedule whenever it changes (schedule.json)."""

    def __init__(self, schedule: Callable[[pl.Trainer], dict], warmup: int, measure: int, max_measure_s: float,
                 save: Callable[[dict], None] | None = None, write: Callable[[str], None] | None = None,
                 now: Callable[[], float] = time.monotonic):
        self.make_schedule, self.save, self.now = schedule, save, now
        self.warmup, self.measure, self.max_measure_s = warmup, measure, max_measure_s
        self.write = write or (lambda line: print(line, flush=True))
        self.schedule: dict | None = None
        self.clock: StepClock | None = None
        self.validated_epoch = -1
        self._announced_val = False

    def _emit(self, trainer, line: str) -> None:
        if trainer.is_global_zero:
            self.write(line)

    def _record(self, trainer, estimate: dict) -> None:
        self.schedule["estimate"] = estimate
        if self.save is not None and trainer.is_global_zero:
            self.save(self.schedule)

    def on_train_start(self, trainer, module):
        self.schedule = self.make_schedule(trainer)
        first_epoch = trainer.current_epoch
        self.clock = StepClock(self.schedule["total_steps"],
                               validation_epochs(self.schedule["max_epochs"], self.schedule["val_every"],
                                                 self.schedule["val_passes"] > 0, first_epoch),
                               self.warmup, self.measure, self.max_measure_s, now=self.now)
        self.clock.begin(trainer.global_step)
        for line in plan_lines(self.schedule):
            self._emit(trainer, line)
        if trainer.global_step:
            self._emit(trainer, f"  resuming at step {trainer.global_step} (epoch {first_epoch + 1}): the estimate "
                                "covers the steps left")
        self._record(trainer, None)

    def on_train_epoch_start(self, trainer, module):
        if self.clock is not None:
            self.clock.epoch_start()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.clock is not None and self.clock.step():
            estimate = self.clock.estimate(trainer.global_step, trainer.current_epoch - 1)
            self._emit(trainer, estimate_line(estimate))
            self._record(trainer, estimate)

    def on_validation_start(self, trainer, module):
        if self.clock is not None and not trainer.sanity_checking:
            self.clock.val_start()

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking or self.clock is None:
            return
        self.clock.val_end()
        self.validated_epoch = trainer.current_epoch
        if not self._announced_val and self.clock.measured_at is not None:
            self._announced_val = True  # the first validation's cost, once: the estimate now covers it
            estimate = self.clock.estimate(trainer.global_step, trainer.current_epoch)
            self._emit(trainer, estimate_line(estimate))
            self._record(trainer, estimate)

    def on_train_epoch_end(self, trainer, module):
        # Lightning calls this after the epoch's validation and after the epoch-mean training loss is reduced;
        # callback_metrics keep the last validation's values: shown only in the epoch that validated
        if self.clock is None:
            return
        validated = self.validated_epoch == trainer.current_epoch
        remaining = self.clock.remaining_s(trainer.global_step, trainer.current_epoch)
        self._emit(trainer, epoch_line(trainer.current_epoch, trainer.max_epochs, trainer.global_step,
                                       self.schedule["total_steps"], trainer.callback_metrics, validated,
                                       self.now() - self.clock.start, remaining))

    def on_train_end(self, trainer, module):
        if self.clock is not None and self.schedule is not None:
            actual = self.clock.estimate(trainer.global_step, trainer.current_epoch)
            self.schedule["actual"] = {"wall_s": actual["elapsed_s"], "step_s": actual["step_s"],
                                       "val_s": actual["val_s"], "steps": trainer.global_step - self.clock.first_step}
            if self.save is not None and trainer.is_global_zero:
                self.save(self.schedule)


class RunProgressBar(TQDMProgressBar):
    """Lightning's bar over the whole run: its total is every step of every epoch, its ETA the run's
    (tqdm's average rate over the elapsed time, validation pauses included: smoothing 0)."""

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.smoothing = 0
        return bar

    def on_train_start(self, trainer, *_):
        super().on_train_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=trainer.estimated_stepping_batches if math.isfinite(trainer.estimated_stepping_batches) else None)
        bar.initial = bar.n = trainer.global_step  # a resumed run starts where it left off

    def on_train_epoch_start(self, trainer, *_):
        # one bar for the run: not reset per epoch as Lightning's is
        self.train_progress_bar.set_description(f"epoch {epoch_number(trainer.current_epoch)}/{trainer.max_epochs}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total or 0):
            bar.n = trainer.global_step
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


def write_schedule(run_dir: Path) -> Callable[[dict], None]:
    from experiments.tracking import write_json

    return lambda schedule: write_json(Path(run_dir) / "schedule.json", schedule)
