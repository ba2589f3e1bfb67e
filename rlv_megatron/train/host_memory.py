"""Give the host allocator's free memory back to the OS after a CPU train step.

glibc's malloc raises its mmap threshold after large frees (up to 32 MiB), so a step's activations end up on
the heap and stay resident once freed: on SmolLM2-135M the trainer held 10.5-11 GiB after a step whose
weights, grads and optimizer are 2 GiB (benchmarks/train_memory.py, 2026-12-07). malloc_trim(0) returns the
free pages (madvise) at the cost of one call per step; a fixed low mmap threshold also cuts the in-step peak
(12.6 -> 9.8 GiB) but made the step 46% slower (page faults), so it is not used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None  # musl and macOS have none


def release_free_memory() -> bool:
    """malloc_trim(0) where glibc provides it; True when it returned memory to the OS."""
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None else False
