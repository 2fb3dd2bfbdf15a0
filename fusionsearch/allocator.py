"""CPU memory settings of a training process: fewer page faults, at the price of peak RSS.

PyTorch's CPU tensors come from ``malloc``. glibc serves large blocks (above a threshold that
adapts up to 32 MiB) with fresh ``mmap`` mappings and unmaps them on ``free``, and it returns the
top of its heap to the kernel once more than a (likewise adaptive) amount is free there. A CPU
training step allocates and frees many tensors of tens of megabytes, so the kernel ends up
zero-filling and page-faulting the same amount of memory again and again: a quarter to a half of
the time of the benchmark's 224x224 criterion step (benchmarks/cmm.py), varying from run to run
with the history of the heap.

:func:`keep_freed_memory` tells glibc to serve every block from its heap and never to trim it:
freed memory is reused by the next allocation instead of being faulted in afresh.

Trade-off: the process keeps its peak memory for its whole life (freed blocks stay resident and
are reused, never returned to the operating system), and fragmentation makes that peak higher:
PyTorch asks for 64-byte aligned blocks, which glibc can place in a freed block of the same size
only after it has coalesced with a neighbour, so the heap grows for the first few steps (a few
times the largest tensor) before it settles. Use it in a training process or a benchmark, not in
a long-lived process that must give memory back. It changes nothing on GPUs (PyTorch's caching
allocator already keeps memory), and it is a no-op without glibc (macOS, Windows, musl).

:func:`use_huge_pages` asks PyTorch to back CPU tensors of 2 MiB and more with transparent huge
pages (``THP_MEM_ALLOC_ENABLE``): memory is then faulted in 2 MiB at a time instead of 4 KiB,
and big elementwise passes miss the TLB less. On the benchmark's pvt_emcad step it makes every
step a few per cent faster and removes most of the page faults of the first steps (the heap still
grows then, see above). PyTorch reads the setting once, at its first CPU allocation, so it must
be made before ``import torch``; the ``fusionsearch`` command does it first thing. It needs Linux
with transparent huge pages in ``madvise`` or ``always`` mode (elsewhere it changes nothing), and
each large tensor is aligned to 2 MiB (the slack before it goes back to the heap).
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_memory_kept = False  # set by keep_freed_memory(); the setting is process-wide and cannot be undone


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory (no mmap for large blocks, no heap trimming).

    Call it once, early (before large tensors exist). Returns True if glibc accepted the settings,
    False where there is no glibc (nothing is changed then). It affects the whole process and
    cannot be undone for memory already kept.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it; musl's mallopt is a stub)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # -1 disables trimming completely (documented in mallopt(3)); 0 mappings: every block from the heap
    global _memory_kept
    _memory_kept = _memory_kept or (mallopt(_M_TRIM_THRESHOLD, -1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1)
    return _memory_kept


def memory_is_kept() -> bool:
    """True once :func:`keep_freed_memory` has taken effect in this process (large temporaries are then cheap)."""
    return _memory_kept


HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Back large CPU tensors with transparent huge pages (Linux); call before ``import torch``.

    Returns True when the setting is in effect for this process: set now, before torch was
    imported, or already set to 1 by the user. An explicit ``THP_MEM_ALLOC_ENABLE=0`` is respected,
    and nothing is changed off Linux. Child processes inherit the setting.
    """
    if not sys.platform.startswith("linux"):
        return False
    if HUGE_PAGES_VARIABLE in os.environ:
        return os.environ[HUGE_PAGES_VARIABLE] == "1"
    if "torch" in sys.modules:  # PyTorch may have read the variable already
        return False
    os.environ[HUGE_PAGES_VARIABLE] = "1"
    return True
