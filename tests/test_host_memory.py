"""The CPU train step hands the freed activations back to the OS (train/host_memory.py)."""

import subprocess
import sys

import pytest

from rlv_megatron.train import host_memory

# In a fresh process (a test worker's heap depends on every earlier test): a 16 MiB free raises glibc's
# dynamic mmap threshold, so the 1 MiB blocks come from the heap; the small block after them pins the heap's
# top, so freeing them trims nothing on its own.
PROBE = """
import psutil, torch
from rlv_megatron.train import host_memory
rss = lambda: psutil.Process().memory_info().rss / 2**20
big = torch.ones(16 * 2**18); del big
blocks = [torch.ones(2**18) for _ in range(300)]
pin = torch.ones(16)
free = host_memory.free_heap_bytes()
del blocks
freed = (host_memory.free_heap_bytes() - free) / 2**20
held = rss()
kept = host_memory.release_free_memory(above=400 * 2**20)  # more than is free: no trim
returned = host_memory.release_free_memory(above=100 * 2**20)
print(kept, returned, held - rss(), freed)
"""


@pytest.mark.skipif(host_memory._libc() is None, reason="no glibc malloc_trim here")
def test_freed_heap_memory_is_returned_after_the_release():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["False", "True"], "trimmed below the threshold, or not above it"
    assert float(out[2]) > 200, f"malloc_trim gave back {out[2]} of the 300 MiB freed"
    assert float(out[3]) > 290, f"mallinfo2 saw {out[3]} MiB of the 300 freed"

