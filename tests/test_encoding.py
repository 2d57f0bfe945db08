"""Text I/O names its encoding: on a machine without a UTF-8 locale (CI, containers, SLURM nodes) the default codec
is ASCII, and our reports carry †, ± and → (a CI run failed on exactly this)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

from tools import encoding_check

REPO = Path(__file__).resolve().parents[1]
ASCII_ENV = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


def test_no_text_io_in_the_repository_relies_on_the_locale():
    bad = [f"{p.relative_to(REPO)}:{c.lineno}" for p in encoding_check.files()
           for c in encoding_check.offending_calls(ast.parse(p.read_text(encoding="utf-8")))]
    assert bad == [], "open/read_text/write_text without encoding= (python tools/encoding_check.py --fix): " + ", ".join(bad)


def test_the_check_finds_what_relies_on_the_locale_and_nothing_else():
    source = "\n".join([
        "open('a')",                              # 1: text, no encoding
        "open('a', 'rb')",                        # binary
        "open('a', 'w', encoding='utf-8')",       # explicit
        "p.read_text()",                          # 4
        "p.write_text('x')",                      # 5
        "p.open('w', newline='')",                # 6
        "p.open(mode='rb')",                      # binary
        "os.open('a', os.O_RDONLY)",              # a file descriptor, no codec
        "tarfile.open('a')",                      # not text
        "open('a', **kw)",                        # may carry an encoding: not flagged
    ])
    assert [c.lineno for c in encoding_check.offending_calls(ast.parse(source))] == [1, 4, 5, 6]


def test_the_fix_appends_utf8_and_keeps_the_code_valid(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("x = open('a')\ny = p.read_text()\nz = p.write_text(\n    'x',\n)\n", encoding="utf-8")
    encoding_check.fix(f, encoding_check.offending_calls(ast.parse(f.read_text(encoding="utf-8"))))
    text = f.read_text(encoding="utf-8")
    assert text == ("x = open('a', encoding=\"utf-8\")\ny = p.read_text(encoding=\"utf-8\")\n"
                    "z = p.write_text(\n    'x',\nencoding=\"utf-8\")\n")
    assert encoding_check.offending_calls(ast.parse(text)) == []


def test_an_entry_point_prints_marks_on_an_ascii_terminal_instead_of_crashing():
    child = ("import sys; from rundir.cli import run_cli\n"
             "def main(argv):\n    print('note: \\u2020 degenerate, 0.19 \\u00b1 0.01'); return 0\n"
             "sys.exit(run_cli(main, 'prog', []))\n")
    probe = subprocess.run([sys.executable, "-c", "import sys; print(sys.stdout.encoding)"], env=ASCII_ENV,
                           capture_output=True, text=True, cwd=REPO)
    assert probe.stdout.strip().lower() in ("ascii", "ansi_x3.4-1968"), probe.stdout  # the condition is real
    r = subprocess.run([sys.executable, "-c", child], env=ASCII_ENV, capture_output=True, cwd=REPO)
    assert r.returncode == 0, r.stderr.decode("utf-8", "replace")
    assert r.stdout == b"note: \\u2020 degenerate, 0.19 \\xb1 0.01\n"
