"""trainer.keep_host_memory: glibc's malloc keeps freed memory, so a tensor-sized allocation after a free
reuses pages already mapped instead of a fresh mmap that the kernel zero-fills page by page (counted here
as minor page faults, not timed)."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import resource, sys
import torch
from experiments.build import configure_backends
from experiments.config import load_config

configure_backends(load_config(["trainer.keep_host_memory=" + sys.argv[1]]))
for _ in range(10):                     # the heap grows until freed 64 MB blocks can be reused (fragmentation)
    a = torch.ones(16 * 2**20); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a = torch.ones(16 * 2**20); del a   # 16384 pages of 4 KiB each (numpy would madvise huge pages)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(keep).lower()], cwd=REPO, capture_output=True,
                          text=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's M_MMAP_MAX is glibc's; elsewhere a no-op")
def test_freed_memory_is_reused_without_page_faults():
    off, on = _faults(False), _faults(True)
    # without: each 64 MB tensor is a fresh mapping, 10 x 16384 faults; with: freed pages are reused
    assert off > 10 * 16384 * 0.9, off
    assert on < 1000, on


def test_null_means_on_except_when_training_on_cuda(monkeypatch):
    import torch

    import experiments.build as build
    from experiments.config import load_config

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    calls = []
    monkeypatch.setattr(build, "keep_freed_memory", lambda: calls.append(1))
    for value, cuda, expected in [("null", False, 1), ("null", True, 0), ("true", True, 1), ("false", False, 0)]:
        calls.clear()
        monkeypatch.setattr(build, "uses_cuda", lambda cfg, cuda=cuda: cuda)
        build.configure_backends(load_config([f"trainer.keep_host_memory={value}", "trainer.threads=0"]))
        assert len(calls) == expected, (value, cuda)


def test_the_setting_reports_whether_glibc_took_it():
    from experiments.host_memory import keep_freed_memory

    code = "from experiments.host_memory import keep_freed_memory as k; print(k())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == str(platform.libc_ver()[0] == "glibc")
    assert callable(keep_freed_memory)
