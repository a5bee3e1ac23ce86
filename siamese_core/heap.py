"""Keep freed tensor memory mapped between CPU training steps (glibc's malloc thresholds).

Why: on CPU, PyTorch's tensors come from malloc. glibc serves large blocks with
``mmap`` and trims its heaps after frees, by thresholds that adapt to the
allocation history, so a loop that frees and reallocates the same few megabytes
every step can end up mapping them afresh each time and page-faulting every page
back in. A Ray Train worker runs its loop in a thread of its own, whose arena
also unmaps whole heaps it has emptied (``bench_pipeline.py --alternate
--glibc-malloc`` counts the page faults and kernel time per side; figures in
benchmarks/RESULTS.md). Fixed thresholds (blocks up to 32 MB from the heap, no trimming, 64 MB of top
pad) keep the pages mapped; the cost is that the process holds on to its peak heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest allowed on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: in effect, never trim
TOP_PAD_BYTES = 64 * 1024 * 1024  # a thread's arena keeps a heap it has emptied rather than unmapping it


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Set this process's malloc thresholds (once); False where the C library is not glibc.

    Process-wide and irreversible, so the entry points that own a training process call it
    (the Train worker's loop, the benchmarks' loops), not library code such as ``fit``.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                (M_TOP_PAD, TOP_PAD_BYTES))
    return all([bool(mallopt(option, value)) for option, value in settings])
