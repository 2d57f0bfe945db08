"""What a run folder is made of, below every other package: atomic result files and run names.

`evaluation`, `sweeps` and `experiments` all write run and report files and name runs; they import these
from here, so neither `evaluation` nor `sweeps` needs `experiments` (tests/test_import_direction.py).
Standard library only.
"""
