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
del blocks
held = rss()
returned = host_memory.release_free_memory()
print(returned, held - rss())
"""


@pytest.mark.skipif(host_memory._libc() is None, reason="no glibc malloc_trim here")
def test_freed_heap_memory_is_returned_after_the_release():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert float(out[1]) > 200, f"malloc_trim gave back {out[1]} of the 300 MiB freed"
