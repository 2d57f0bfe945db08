"""What a run folder is made of, below every other package: atomic result files and run names.

`evaluation`, `sweeps` and `experiments` all write run and report files and name runs; they import these
from here, so neither `evaluation` nor `sweeps` needs `experiments` (tests/test_import_direction.py).
`rundir.cli` holds what every command-line entry point shares (`--debug`, one-line errors, the filter of
third-party warnings), here for the same reason: datamodules, evaluation and sweeps have entry points too.
Standard library only.
"""
