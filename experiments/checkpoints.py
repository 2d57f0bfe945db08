"""Checkpoints that survive kills and full disks, resume the same run, and never run code when read.

- `AtomicCheckpointIO` (the trainer's CheckpointIO) writes every checkpoint (last.ckpt, best-*.ckpt,
  ...) to a `.tmp-*` file in the checkpoint's own folder, fsyncs it and renames it over the target.
  A kill or a full disk mid-save leaves the previous file whole. Lightning's own save stages the file in
  /tmp and moves it across filesystems, which is a copy: a full disk truncated `last.ckpt` there. Before
  `last.ckpt` is replaced, the previous one is kept as `last-prev.ckpt`: a fallback if the newest ever
  fails to load.
- `LastCheckpoint` writes `last.ckpt` at the end of every training epoch (and every N steps) with the
  random generators' states, so a resumed run draws what the uninterrupted run would have drawn.
- `resume_point` picks the newest checkpoint that loads and fits the module; the others are moved aside
  (`<name>.corrupt-<time>`) with a message. A run never gets stuck on a damaged file.
- Every read is `weights_only=True`: a checkpoint holds tensors, numbers, strings and containers, and
  unpickling anything else (a crafted `__reduce__`) is refused instead of executed.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO

LAST = "last.ckpt"
PREVIOUS = "last-prev.ckpt"
TMP_PREFIX = ".tmp-"

# Types beyond tensors, numbers, strings and containers that our checkpoints hold, for torch's
# weights_only unpickler. Measured on checkpoints of every preset (3D/2D networks, every loss,
# every selection rule): none. Add a type here only after seeing a real checkpoint need it.
SAFE_GLOBALS: tuple = ()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, not ours, or of another model."""


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents, unpickled with weights_only=True (no code runs). Raises CheckpointError
    naming the file for anything unreadable: truncated, empty, not a torch file, or a refused pickle."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as e:
        # torch's message says what it refused (e.g. "Unsupported global: GLOBAL posix.system")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused to load: it holds objects a checkpoint never contains, which "
                              f"could run code ({first})") from None
    except Exception as e:  # truncated zip, empty file, text: the unpickler fails in many ways on garbage
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else 'empty'})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (a {type(state).__name__}, not a dict)")
    return state


def finished_epochs(state: dict) -> int:
    """Training epochs a checkpoint had completed. Lightning's `epoch` is the epoch in progress when it
    was saved; the fit loop's progress counts epochs whose training ended (saved in on_train_epoch_end,
    `processed` already counts the epoch, `completed` does not yet)."""
    try:
        return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(state.get("epoch", 0))


def mid_epoch_note(state: dict) -> str:
    """'' for a checkpoint written at an epoch's end; for one written every N steps, how far into the next
    epoch it is (a resume from there keeps the progress, not bitwise the uninterrupted run's numbers)."""
    try:
        loop = state["loops"]["fit_loop"]
        epochs, batches = loop["epoch_progress"]["current"], loop["epoch_loop.batch_progress"]["current"]
        if epochs["started"] > epochs["processed"]:
            return f", {batches['processed']} step(s) into epoch {epochs['processed'] + 1}"
    except (KeyError, TypeError):
        pass
    return ""


def check_fits(state: dict, module: torch.nn.Module, path: Path) -> None:
    """The checkpoint's weights have the module's names and shapes: a checkpoint of another network or
    configuration (copied in, or left by an older version) is refused before Lightning half-loads it."""
    if "state_dict" not in state or "loops" not in state:
        raise CheckpointError(f"{path}: not a training checkpoint (no state_dict or loop state)")
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state["state_dict"].items() if isinstance(v, torch.Tensor)}
    if want != have:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise CheckpointError(f"{path}: weights of another model (missing {missing[:3]}, unexpected {extra[:3]}, "
                              f"other shapes {shapes[:3]}): a checkpoint of another configuration")


def move_aside(path: Path, why: str, say: Callable[[str], None]) -> Path:
    """Rename an unusable checkpoint `<name>.corrupt-<time>` (kept for inspection, never read again)."""
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    say(f"{why}\n  moved aside to {target}")
    return target


def resume_point(folder: Path, module: torch.nn.Module, say: Callable[[str], None],
                 repair: bool = True) -> tuple[Path | None, int, str]:
    """(checkpoint to resume from, its finished epochs, mid_epoch_note): the newest of last.ckpt and
    last-prev.ckpt that loads and fits `module`, or (None, 0, '') to start clean. Unusable ones are moved
    aside (`repair`; other DDP ranks only skip them: rank zero has moved them before they start)."""
    for name in (LAST, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            state = read_checkpoint(path)
            check_fits(state, module, path)
        except CheckpointError as e:
            if repair:
                move_aside(path, f"cannot resume from {e}", say)
            continue
        return path, finished_epochs(state), mid_epoch_note(state)
    return None, 0, ""


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Remove `.tmp-*` files a killed save left in `folder`. Call it only while holding the run's lock:
    then no live process is writing one."""
    removed = sorted(folder.glob(f"{TMP_PREFIX}*")) if folder.is_dir() else []
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_save(checkpoint: dict, path: str | Path, keep_previous: bool = False) -> None:
    """torch.save `checkpoint` to `path` atomically: a temp file in the same folder (same filesystem, so
    the rename never copies), flushed and fsynced, then renamed over `path`. On any failure (disk full,
    quota, kill) the temp file is removed and `path` is as it was. `keep_previous`: the replaced file
    becomes `last-prev.ckpt`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # serialized in memory first (as Lightning does): torch's file writer turns a failed write into
    # "unexpected pos", a plain write raises the OSError that says why (ENOSPC, EFBIG, EDQUOT)
    data = io.BytesIO()
    torch.save(checkpoint, data)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())  # some filesystems report a full disk only here
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise OSError(f"could not write checkpoint {path} ({type(e).__name__}: {e}); the previous "
                          f"{path.name} is untouched") from e
        raise
    if keep_previous and path.exists():
        # a crash between these renames leaves last-prev.ckpt and no last.ckpt: resume_point takes it
        os.replace(path, path.with_name(PREVIOUS))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's CheckpointIO with atomic same-folder saves and weights_only loads whatever the caller
    asks (Lightning passes None, torch's default, which older torch versions read as False)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_save(checkpoint, path, keep_previous=Path(path).name == LAST)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # read onto the CPU: Lightning copies the weights into the module and moves optimizer states to
        # the module's device itself
        return read_checkpoint(path)


def collect_rng_states() -> dict:
    """The global generators' states as tensors, ints and lists only (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [int(version), list(py_state), py_gauss]}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = states["python"]
    random.setstate((version, tuple(py_state), py_gauss))


class LastCheckpoint(pl.Callback):
    """`last.ckpt` after every training epoch, and every `every_n_steps` optimizer steps (0: never).

    Hooked on `on_train_epoch_end`, which Lightning calls after the epoch's validation: the selection
    rules' ModelCheckpoints (saving on validation end) have already recorded this epoch, so the state
    written here is whole. Listed before RunProgress (experiments.progress), so `[epoch k/N]` is printed once epoch k is safe.
    Before every save the module's `check_finite_loss` runs: diverged weights are never written over the
    last good ones. The checkpoint carries the random generators' states; resuming restores them before
    the first resumed epoch draws anything, so its patches are those of the uninterrupted run.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 0):
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def _save(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        check = getattr(module, "check_finite_loss", None)
        if check is not None:
            check()
        trainer.save_checkpoint(str(self.path), weights_only=False)  # the whole training state, to resume

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        # the epoch's last batch is saved by on_train_epoch_end, after its validation
        if n > 0 and trainer.global_step % n == 0 and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save(trainer, module)

    def on_train_epoch_end(self, trainer, module) -> None:
        self._save(trainer, module)

    def state_dict(self) -> dict:
        return {"rng": collect_rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores callbacks before it builds the first resumed epoch's loader iterator (which
        # draws a seed), and nothing between draws random numbers: restoring here is restoring at the
        # point the checkpoint was written.
        if "rng" in state_dict:
            set_rng_states(state_dict["rng"])


def load_module(cls: type[pl.LightningModule], path: str | Path, map_location: Any = "cpu") -> pl.LightningModule:
    """`cls.load_from_checkpoint` with weights_only=True; a file it cannot use raises CheckpointError naming
    the file and why (refused pickle, truncated, not a checkpoint) instead of Lightning's traceback."""
    try:
        return cls.load_from_checkpoint(str(path), map_location=map_location, weights_only=True)
    except Exception:
        read_checkpoint(path)  # raises CheckpointError when the file itself is the problem
        raise
