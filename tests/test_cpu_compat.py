"""The CPU workarounds: every megatron-core/torch internal they patch must still exist, and they work."""

import importlib
import subprocess
import sys

import pytest

from rlv_megatron.models import cpu_compat
from rlv_megatron.rollout import cpu_executor


@pytest.mark.parametrize("module,attr", cpu_compat.PATCHED_INTERNALS + cpu_executor.PATCHED_INTERNALS)
def test_patched_internal_exists(module, attr):
    # A megatron-core upgrade that renames one of these would make the patch silently not apply.
    obj = importlib.import_module(module)
    for part in attr.split("."):
        assert hasattr(obj, part), f"{module}.{attr} is gone: revisit cpu_compat.py / rollout/cpu_executor.py"
        obj = getattr(obj, part)


_PROBE = r"""
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
from rlv_megatron.models import cpu_compat
assert cpu_compat.apply_if_no_gpu()
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
ps.initialize_model_parallel()
model_parallel_cuda_manual_seed(7)
tracker = get_cuda_rng_tracker()
before = torch.get_rng_state()
with tracker.fork():
    a = torch.rand(3)
with tracker.fork():
    b = torch.rand(3)
assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
assert not torch.equal(a, b), "the tracked stream must advance between forks"
assert torch.zeros(2, device="cuda").device.type == "cpu"
assert torch.ones(2).cuda().device.type == "cpu"
assert torch.ones(2).to("cuda").device.type == "cpu"
assert torch.ones(2, dtype=torch.float32).type() == "torch.cuda.FloatTensor"
assert torch.cuda.current_device() == "cpu"
torch.cuda.synchronize()
print("ok")
"""


def test_patches_work_in_a_fresh_process():
    from rlv_megatron.dist import free_port

    out = subprocess.run([sys.executable, "-c", _PROBE % free_port()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
