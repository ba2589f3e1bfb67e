"""A stand-in GPU for CPU tests: tensors that hold real CPU data but live on another device, so that code which
mixes device and host tensors fails here as it would on CUDA.

Why not FakeTensorMode: its `cuda` tensors carry no data (boolean masks, `nonzero` and `.item()` raise) and
autograd aborts the process on a CPU-only build ("PyTorch is not linked with support for cuda devices").
Here, inside `fake_gpu()`:
  - a tensor asked for on the stand-in device (`to_gpu(t)`, `.cuda()`, `device=x.device` of a GPU tensor) is
    a `GPUTensor`: its data is an ordinary CPU tensor, its reported device is `meta` (autograd supports it;
    a CPU-only torch refuses the name "cuda" before any dispatch);
  - an op that gets a GPU tensor and a host tensor of one or more dimensions raises `DeviceMismatch`, as
    CUDA does; 0-dim host tensors are allowed (CUDA treats them as scalars), and so are the cross-device
    copies (`copy_`, `.to`, `.cpu()`). Stricter than CUDA in one place: a host index tensor on a GPU tensor is
    refused (CUDA copies it over, with a synchronisation).
  - `nccl_collectives()` replaces torch.distributed's tensor collectives by checks that refuse host tensors,
    as NCCL does, for code that believes it runs in a group of two (the values are left as they are).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

_GPU_TYPES = ("meta",)
_CROSS_DEVICE = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default, torch.ops.aten.copy.default}


class DeviceMismatch(RuntimeError):
    pass


class GPUTensor(torch.Tensor):
    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                device="meta", requires_grad=elem.requires_grad)
        t.elem = elem
        return t

    def __repr__(self):
        return f"GPUTensor({self.elem})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _FakeGPU.dispatch(func, args, kwargs or {})


def _is_gpu_device(d) -> bool:
    return d is not None and torch.device(d).type in _GPU_TYPES


def _unwrap(x):
    return x.elem if isinstance(x, GPUTensor) else x


class _FakeGPU(TorchDispatchMode):
    @staticmethod
    def dispatch(func, args, kwargs):
        flat, _ = tree_flatten((args, kwargs))
        wrappers = {id(x.elem): x for x in flat if isinstance(x, GPUTensor)}
        host = [x for x in flat if isinstance(x, torch.Tensor) and not isinstance(x, GPUTensor) and x.dim() > 0]
        if wrappers and host and func not in _CROSS_DEVICE:
            raise DeviceMismatch(f"{func}: a host tensor of shape {tuple(host[0].shape)} meets a GPU tensor")
        device = kwargs.get("device")
        if "device" in kwargs:
            kwargs = {**kwargs, "device": "cpu" if _is_gpu_device(device) else device}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        # on the GPU: what was asked for there, and what GPU inputs give unless sent elsewhere
        to_gpu = _is_gpu_device(device) or (bool(wrappers) and device is None)

        def wrap(x):
            if not isinstance(x, torch.Tensor) or isinstance(x, GPUTensor):
                return x
            if id(x) in wrappers:  # in place or out=: the tensor that was passed
                return wrappers[id(x)]
            return GPUTensor(x) if to_gpu else x

        return tree_map(wrap, out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.dispatch(func, args, kwargs or {})


@contextlib.contextmanager
def fake_gpu():
    """Within the block, "cuda" tensors are GPUTensors (see the module docstring)."""
    def from_data(make):  # torch.tensor / as_tensor build their tensor without dispatching a factory op
        def build(data, *args, device=None, **kwargs):
            t = make(data, *args, **kwargs)
            return GPUTensor(t) if _is_gpu_device(device) else t if device is None else t.to(device)
        return build

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self.to("meta")))
        stack.enter_context(mock.patch.object(torch, "tensor", from_data(torch.tensor)))
        stack.enter_context(mock.patch.object(torch, "as_tensor", from_data(torch.as_tensor)))
        stack.enter_context(_FakeGPU())
        yield


def to_gpu(x):
    """A tensor (or a nested structure of them) moved to the stand-in GPU."""
    return tree_map(lambda t: GPUTensor(t.detach().clone().requires_grad_(t.requires_grad))
                    if isinstance(t, torch.Tensor) and not isinstance(t, GPUTensor) else t, x)


def on_gpu(t) -> bool:
    return isinstance(t, GPUTensor)


@contextlib.contextmanager
def nccl_collectives(world: int = 2):
    """torch.distributed as seen by code in a group of `world` NCCL ranks: world sizes read `world`, the
    backend reads "nccl", and every tensor collective refuses a host tensor (the values stay as they are)."""
    def check(name):
        def collective(*args, **kwargs):
            tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
            for t in tensors:
                if not on_gpu(t):
                    raise DeviceMismatch(f"dist.{name}: NCCL refuses a host tensor of shape {tuple(t.shape)}")
            return None
        return collective

    names = ("all_reduce", "broadcast", "send", "recv", "all_gather", "all_gather_into_tensor",
             "reduce_scatter_tensor", "all_to_all_single", "isend", "irecv")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(dist, name, check(name)))
        stack.enter_context(mock.patch.object(dist, "get_world_size", lambda group=None: world))
        stack.enter_context(mock.patch.object(dist, "get_backend", lambda group=None: "nccl"))
        stack.enter_context(mock.patch.object(dist, "is_initialized", lambda: True))
        stack.enter_context(mock.patch("rlv_megatron.dist.comm_device", lambda group=None: torch.device("meta")))
        yield
