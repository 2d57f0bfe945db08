"""What every command-line entry point shares: `--debug`, one-line errors, quiet third-party warnings.

    if __name__ == "__main__":
        sys.exit(run_cli(main, "python -m experiments.loso"))

- `--debug` (anywhere on the command line, or COVID_DG_DEBUG=1) is taken out before `main` sees its
  arguments and shows the traceback of an error instead of its one line.
- An error a user can fix (a config value, a missing file, a damaged input: `ValueError`,
  `FileNotFoundError`, `NotADirectoryError`, and what the entry point adds) ends as one line
  `<prog>: error: <message>` on stderr with exit status 2, like argparse's own errors. Any other exception
  is a bug and keeps its traceback.
- `quiet_third_party_warnings()` hides the warnings of our dependencies that no user can act on (issue
  19: six lines of them on every run buried our own); our warnings and every other one still show.

Standard library only: every package (datamodules, evaluation, sweeps, experiments) may import it.
"""
from __future__ import annotations

import difflib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

DEBUG_FLAG = "--debug"
DEBUG_ENV = "COVID_DG_DEBUG"
# errors a user can fix from their one-line message; exit status 2 ("bad input", argparse's status)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to `word` (difflib's ratio >= 0.6), or None."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the closest of `choices`, or '' when none is close."""
    close = closest(word, choices)
    return f"; did you mean {close!r}?" if close else ""


_debug = False


def debugging() -> bool:
    """Whether this process was started with --debug (or COVID_DG_DEBUG=1): show tracebacks, not one line."""
    return _debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")


# (message regex, category) of warnings.filterwarnings; each hides a message that a dependency prints on
# every run and that no user of covid-dg can act on. Matched on the message, so the same text from our
# own code would be hidden too: each is worded in the dependency's terms, which ours never use.
THIRD_PARTY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning's own call of a torch pytree API that torch deprecated (pytorch_lightning/utilities/
    # _pytree.py): Lightning's code, not ours, and nothing computed changes.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
    # Our LightningModule overrides `on_before_batch_transfer` (the leakage guard on the host batch),
    # `transfer_batch_to_device` (the patch batch's tensors moved directly) and `on_after_batch_transfer` (the
    # GPU-side augmentation), and the run passes a LightningDataModule too: Lightning says it uses the
    # module's hooks, which is what we want.
    (r"You have overridden `(on_before_batch_transfer|transfer_batch_to_device|on_after_batch_transfer)` in "
     r"`LightningModule` but have passed in a `LightningDataModule`", Warning),
)

# (logger, text) of log records to drop: Lightning advertises its `litlogger` package on every Trainer
# (rank_zero_info, an INFO record); the other records of these loggers (devices used, ...) still show.
THIRD_PARTY_LOG_LINES: tuple[tuple[str, str], ...] = (
    ("pytorch_lightning.utilities.rank_zero", "litlogger"),
    ("lightning_fabric.utilities.rank_zero", "litlogger"),
    ("lightning.pytorch.utilities.rank_zero", "litlogger"),
)


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party_warnings() -> None:
    """Install the filters of THIRD_PARTY_WARNINGS and THIRD_PARTY_LOG_LINES (idempotent; imports nothing).
    W&B's "anonymous setting has no effect" line is not filtered but avoided at its cause
    (experiments.tracking.make_wandb_logger)."""
    for message, category in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in THIRD_PARTY_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))


class PlainFormatter(logging.Formatter):
    """Log lines as a user reads them: an INFO record (Lightning's "GPU available: False, used: False") as its
    message, a warning or error with its level and logger. logging's default format would print
    "INFO:pytorch_lightning.utilities.rank_zero:GPU available: ...": Lightning adds its own plain handler
    only when the root logger has none at its import, and our entry points configure the root first."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {record.name}: {text}"


def configure_logging() -> None:
    """Root logger at WARNING, to stderr, through PlainFormatter. basicConfig does nothing once the root
    has a handler: a second call, and an entry point's own logging.basicConfig afterwards, are no-ops."""
    handler = logging.StreamHandler()
    handler.setFormatter(PlainFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def tolerate_ascii_terminals() -> None:
    """Our lines carry marks such as †, ± and →. On a machine without a UTF-8 locale (a bare container, a CI or
    SLURM node: stdout encoded as ASCII) printing one would raise UnicodeEncodeError mid-run; there the mark is
    written as an escape (\\u2020) instead. Streams already UTF-8, or not reconfigurable (captured), are left."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a stream that does not allow it (detached, closed)
                pass


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without `--debug`, and whether it (or COVID_DG_DEBUG=1) asked for tracebacks."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return [a for a in argv if a != DEBUG_FLAG], debug


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError) and text.startswith("'"):
        text = text.strip("'")
    return text.splitlines()[0] if text else type(e).__name__


# set by the `covid-dg` console script (experiments.cli) while it runs a command: the name its errors carry
dispatched_as: str | None = None


def command_name(prog: str) -> str:
    """The name an error line starts with: the command as typed (`covid-dg loso` when the console script
    dispatched it), else the entry point's own `prog` (`python -m experiments.loso`)."""
    return dispatched_as or prog


def run_cli(main: Callable[[list[str]], Any], prog: str, argv: list[str] | None = None,
            errors: Mapping[type[BaseException], int] | None = None) -> int:
    """Call `main(argv)` the way every entry point does, returning the exit status: `main`'s own int
    return (0 for any other return), argparse's SystemExit as it is, a user error (USER_ERRORS and the
    `errors` given: class -> exit status) as one line `prog: error: ...`, unless --debug."""
    global _debug
    prog = command_name(prog)
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    _debug = debug
    quiet_third_party_warnings()
    configure_logging()
    tolerate_ascii_terminals()
    status = dict(errors or {})  # the entry point's classes first: they may subclass a default one
    for cls in USER_ERRORS:
        status.setdefault(cls, 2)
    try:
        result = main(argv)
    except tuple(status) as e:
        if debug:
            raise
        code = next(code for cls, code in status.items() if isinstance(e, cls))
        # an error may list several things on purpose (datamodules.DataError: one line per bad file)
        message = str(e).strip() if getattr(e, "multiline", False) else first_line(e)
        prefix = "" if message.startswith("error:") else "error: "
        print(f"{prog}: {prefix}{message}  ({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
        return code
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
