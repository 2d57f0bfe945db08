"""Keep freed host memory in the process instead of handing it back to the kernel after every tensor.

glibc's malloc serves every allocation above its mmap threshold (32 MB at most on 64-bit) with a fresh
mmap and unmaps it on free. A CPU training step allocates and frees tensors of that size dozens of times
(logits, the loss's [B, C, N] temporaries, activations and their gradients), and the kernel zero-fills each
fresh mapping page by page on first touch. `python -m benchmarks.run --quick --only loop` (batch 8 of
128x128x32, 2 cores, 2026-12-06, through the GLIBC_TUNABLES below): 1758 ms per step, about half of it kernel time; 483 ms with mmap off and
freed memory kept in the heap. PyTorch's CUDA caching allocator does the same for device memory; nothing
in torch does it for the host.

`keep_freed_memory()` sets M_MMAP_MAX=0 and a high M_TRIM_THRESHOLD through mallopt(3), as
GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=... would at start-up. The price is
memory: the heap never shrinks, and large blocks freed between small live ones fragment it. The same
benchmark peaked at 3.8 GB resident instead of 2.1 GB; a loop of one 64 MB tensor settles at 595 MB of heap.
Allocations of threads other than the main one still use mmap above 64 MB (glibc's per-thread heaps).
Switched by `trainer.keep_host_memory` (base.yaml; null: on when not training on CUDA, where the host
holds only the loader's batches); a no-op without glibc (macOS, musl).
"""
from __future__ import annotations

import ctypes

# mallopt(3) parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest int: free memory at the heap's top is kept up to 2 GiB


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory; True when glibc accepted both settings, False elsewhere."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
