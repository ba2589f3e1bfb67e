"""The CPU train step hands the freed activations back to the OS (train/host_memory.py)."""

import psutil
import pytest
import torch

from rlv_megatron.train import host_memory


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.skipif(host_memory._libc() is None, reason="no glibc malloc_trim here")
def test_freed_heap_memory_is_returned_after_the_release():
    # a large free raises glibc's mmap threshold, so the 1 MiB blocks below come from the heap; the last
    # small block pins the heap's top, so nothing is trimmed on its own
    big = torch.ones(16 * 2**18)  # 16 MiB: under the 32 MiB cap of the dynamic threshold
    del big
    blocks = [torch.ones(2**18) for _ in range(300)]  # 300 x 1 MiB
    pin = torch.ones(16)
    del blocks
    held = _rss_mib()
    assert host_memory.release_free_memory()
    assert held - _rss_mib() > 200, "malloc_trim gave back less than 200 of the 300 MiB freed"
    del pin
