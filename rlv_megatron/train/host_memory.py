"""Give the host allocator's free memory back to the OS after a CPU train step, when there is enough of it.

glibc's malloc raises its mmap threshold after large frees (up to 32 MiB), so a step's activations end up on
the heap and stay resident once freed: on SmolLM2-135M the trainer held 10.5-11 GiB after a step whose
weights, grads and optimizer are 2 GiB (benchmarks/train_memory.py, 2026-12-07). malloc_trim(0) returns the
free pages (madvise), and the next step faults them back in: about 0.25 s per GiB here. On the default job's
0.8M model (0.75 GiB free after each step) that made SFT steps 30% slower (684 -> 890 ms), for memory nobody
needed; so the trim runs only when the heap holds more than `TRIM_ABOVE` free. A fixed low mmap threshold
also cuts the in-step peak (12.6 -> 9.8 GiB) but made the SmolLM2 step 46% slower, so it is not used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

TRIM_ABOVE = 2 << 30  # bytes free on the heap below which a trim costs more time than its memory is worth


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33, every arena summed
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if lib is None or not hasattr(lib, "malloc_trim"):
        return None  # musl and macOS have none
    if hasattr(lib, "mallinfo2"):
        lib.mallinfo2.restype = _MallInfo2
    return lib


def free_heap_bytes() -> int | None:
    """Bytes malloc holds free (resident or not) in its arenas; None where glibc cannot say."""
    lib = _libc()
    return lib.mallinfo2().fordblks if lib is not None and hasattr(lib, "mallinfo2") else None


def release_free_memory(above: int = TRIM_ABOVE) -> bool:
    """malloc_trim(0) where glibc provides it and holds more than `above` bytes free (always, when it cannot
    say how much); True when it returned memory to the OS."""
    lib = _libc()
    if lib is None:
        return False
    free = free_heap_bytes()
    return False if free is not None and free < above else bool(lib.malloc_trim(0))
