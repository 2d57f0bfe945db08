"""Training-step values handed to Lightning at the rate its loggers write them, not one `self.log` per step.

Why our own and not `LightningModule.log` in every step: each call costs ~0.7 ms of host time (Lightning moves its
result object to the value's device through `apply_to_collection` over the object's whole `nn.Module` state,
every call), the largest single part of the training loop's overhead at batch 8 (docs/gpu.md). And a value
logged with `prog_bar=True` is read on the host (`.item()`) after every batch, whether or not a progress bar
is shown: a device sync per step on a GPU. Yet the loggers only ever see the step value every
`trainer.log_every_n_steps` steps and the epoch mean once.

`TrainLog` keeps each step's value on its device (no host sync) and calls `self.log` only when Lightning will
write: the step value at the steps Lightning logs (`global_step % log_every_n_steps == 0`, or when the
trainer stops), the epoch value once, at the epoch's last batch. Same keys and same numbers as the per-step
calls (tested bit for bit against them through a CSV logger, `tests/test_train_logging.py`): `{name}_step`
and `{name}_epoch` for a value logged per step, `{name}` for an epoch-only value; the epoch value is the
batch-size-weighted mean of every step, accumulated in the same order as Lightning does.
What differs: a progress bar's step value changes only at those steps, and only a run with a progress
bar asks for `prog_bar` (then Lightning reads the values on the host after each batch, as before).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Series:
    per_step: bool            # logged per step too (`{name}_step`), not only as the epoch mean
    last: torch.Tensor | None = None
    last_batch: int = 0
    total: torch.Tensor | None = None   # sum over the epoch of value * batch_size (float32 or wider)
    count: int = 0                       # sum of batch sizes


def _as_logged(value: torch.Tensor) -> torch.Tensor:
    """What Lightning stores of a logged value: detached, one element, float32 or wider."""
    value = value.detach()
    if value.numel() != 1:
        raise ValueError(f"a logged training value must have one element, got shape {tuple(value.shape)}")
    value = value.reshape(())
    if value.dtype not in (torch.float32, torch.float64):
        value = value.to(torch.get_default_dtype())
    return value


def step_logged(trainer) -> bool:
    """Whether Lightning writes this step's values to the loggers (its `should_update_logs`, seen from
    `on_train_batch_end`: the optimizer has stepped, so `global_step` counts this step)."""
    n = int(trainer.log_every_n_steps)
    return bool(trainer.fast_dev_run) or bool(trainer.should_stop) or (n > 0 and trainer.global_step % n == 0)


def epoch_ends(trainer, batch_idx: int) -> bool:
    """Whether this batch is the epoch's last: the loader's last batch, the trainer stopping, or max_steps.
    A training loader without a length (an epoch of unknown size) is refused: its epoch mean would never be
    logged, silently (our loaders always have one)."""
    if trainer.num_training_batches == float("inf"):
        raise RuntimeError("TrainLog needs a training loader with a length: the epoch's last batch decides when "
                           "the epoch mean is logged")
    max_steps = int(trainer.max_steps if trainer.max_steps is not None else -1)
    return (batch_idx + 1 >= trainer.num_training_batches or bool(trainer.should_stop)
            or (max_steps >= 0 and trainer.global_step >= max_steps))


class TrainLog:
    """Values of the training steps, on their device until Lightning writes them (module docstring)."""

    def __init__(self):
        self.series: dict[str, _Series] = {}

    def add(self, name: str, value: torch.Tensor, batch_size: int, per_step: bool = False) -> None:
        """Record one step's `value` (a one-element tensor) for a batch of `batch_size` samples."""
        value = _as_logged(value)
        s = self.series.get(name)
        if s is None:
            s = self.series[name] = _Series(bool(per_step))
        elif s.per_step != bool(per_step):
            raise ValueError(f"{name}: added both per step and epoch-only")
        s.last, s.last_batch = value, int(batch_size)
        # the epoch sum in Lightning's order (0 + v1*b1 + v2*b2 ...): the same float32 rounding as its own mean
        weighted = value * int(batch_size)
        s.total = weighted if s.total is None else s.total + weighted
        s.count += int(batch_size)

    def reset_epoch(self) -> None:
        for s in self.series.values():
            s.total, s.count = None, 0

    def flush(self, module, batch_idx: int) -> None:
        """Hand Lightning what it writes after this batch: call from `on_train_batch_end`."""
        trainer = module.trainer
        prog_bar = trainer.progress_bar_callback is not None
        if step_logged(trainer):
            for name, s in self.series.items():
                if s.per_step and s.last is not None:
                    module.log(f"{name}_step", s.last, on_step=True, on_epoch=False, prog_bar=prog_bar,
                               batch_size=s.last_batch)
        if epoch_ends(trainer, batch_idx):
            for name, s in self.series.items():
                if s.count:
                    # reduce_fx sum over this one call: Lightning keeps total / count as is (a mean reduction
                    # would multiply by count and divide again, and could round differently)
                    module.log(f"{name}_epoch" if s.per_step else name, s.total / s.count, on_step=False,
                               on_epoch=True, prog_bar=prog_bar and s.per_step, reduce_fx="sum",
                               batch_size=s.count)
            self.reset_epoch()
