"""Training state off the GPU while a colocated engine is awake (train.offload_during_rollout).

In sync mode with sleep mode, the engine sleeps while the trainer trains and is awake from the weight sync
to the end of the next step's rollouts (through evaluations and checkpoints in between). What training alone
needs, the optimizer state and the gradient buffers, goes to host memory for that time, as verl and NeMo-RL
do; the weights stay (the sync streams them, an evaluation under verifier.kind=head runs them). Then the
caching allocator hands its free blocks back (`torch.cuda.empty_cache()`: vLLM runs in other processes), so
the awake engine finds `rollout.gpu_memory_utilization` of the GPU free beside the weights (`rlv plan`'s
generation phase). Off: the whole training state stays resident beside the engine (its free blocks are
still returned).

What moves: every tensor of the optimizer's state (Adam's moments, and its step where it lives on the GPU)
and the fp32 master copies of bf16 weights (megatron's `fp32_from_float16_groups` /
`shard_fp32_from_float16_groups`), each by swapping its `.data` for a host copy, so every reference to it (the
param groups, `model_param.main_param`) follows, and a checkpoint saved while the engine is awake reads the host
copies (megatron's save copies them `.cpu()` anyway); the fp32 master copies of fp32 weights are views of the
weights and stay. The DDP gradient buffers are dropped (their storage resized to 0, which frees every view
of it, `main_grad` and the optimizer's `.grad`s) and come back zeroed: each train step zeroes them first.
Host copies are pinned on GPU and kept for the next offload (pinning is slow to allocate).

On CPU the device's memory is the host's: the loop's calls do nothing. The moving code runs anywhere with an
injectable (device, host) pair: tests/test_offload.py round-trips it on CPU.
"""

from __future__ import annotations

import gc

import torch

__all__ = ["StateOffload", "active", "before_generation", "after_generation", "ensure_resident"]


def active(cfg) -> bool:
    """Whether the loop offloads: train.offload_during_rollout, with the engine asleep while training on a
    GPU it shares with the trainer (rollout.enable_sleep_mode, sync mode, no engine GPUs of its own)."""
    if cfg is None or not torch.cuda.is_available():
        return False
    ro = cfg.rollout
    return bool(cfg.train.offload_during_rollout and ro.enable_sleep_mode and ro.mode == "sync"
                and not ro.engine_gpus)


def _optimizers(optimizer):
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if o is not None]


def _master_copies(opt) -> list[torch.Tensor]:
    """The fp32 copies a megatron optimizer keeps of bf16/fp16 weights (standalone tensors, not views)."""
    out = []
    for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
        for group in getattr(opt, attr, None) or []:
            out += [t for t in group if torch.is_tensor(t)]
    return out


def _state_tensors(opt) -> list[torch.Tensor]:
    inner = getattr(opt, "optimizer", None)
    if inner is None:
        return []
    return [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t)]


def _grad_buffers(chunks) -> list[torch.Tensor]:
    """The DDP chunks' flat gradient buffers that do not share storage with the weights."""
    out = []
    for c in chunks:
        for buf in list(getattr(c, "buffers", [])) + list(getattr(c, "expert_parallel_buffers", [])):
            g, p = getattr(buf, "grad_data", None), getattr(buf, "param_data", None)
            if g is None:
                continue
            if p is not None and p.untyped_storage().data_ptr() == g.untyped_storage().data_ptr():
                continue  # a buffer shared with the weights (megatron's reuse_grad_buf_for_mxfp8_param_ag)
            out.append(g)
    return out


class StateOffload:
    """Moves a policy's optimizer state to `host` and drops its gradient buffers (`offload`), and back onto
    the devices they came from (`reload`). `device`: the device type whose tensors move (default: cuda)."""

    def __init__(self, device: str | torch.device = "cuda", host: str | torch.device = "cpu"):
        self.device = torch.device(device).type
        self.host = torch.device(host)
        self.pin = self.device == "cuda" and self.host.type == "cpu"
        self._moved: list[tuple[torch.Tensor, torch.device]] = []  # (tensor, its device) while offloaded
        self._dropped: list[tuple[torch.Tensor, int]] = []  # (grad buffer, its storage bytes)
        self._host: dict[int, torch.Tensor] = {}  # id(tensor) -> its host copy, kept between offloads
        self.offloaded = False
        self.bytes = {"optimizer": 0, "grads": 0}  # of the last offload

    def _to_host(self, t: torch.Tensor) -> None:
        host = self._host.get(id(t))
        if host is None or host.shape != t.shape or host.dtype != t.dtype:
            host = torch.empty(t.shape, dtype=t.dtype, device=self.host, pin_memory=self.pin)
            self._host[id(t)] = host
        host.copy_(t.data, non_blocking=self.pin)
        self._moved.append((t, t.device))
        t.data = host

    def offload(self, chunks, optimizer) -> dict[str, int]:
        """Optimizer state to host, gradient buffers dropped; returns the bytes freed by kind. Twice: once."""
        if self.offloaded:
            return self.bytes
        self.bytes = {"optimizer": 0, "grads": 0}
        seen: set[int] = set()
        for opt in _optimizers(optimizer):
            for t in _master_copies(opt) + _state_tensors(opt):
                if id(t) in seen or t.device.type != self.device:
                    continue
                seen.add(id(t))
                self.bytes["optimizer"] += t.numel() * t.element_size()
                self._to_host(t)
            inner = getattr(opt, "optimizer", None)
            for group in getattr(inner, "param_groups", []):
                for p in group["params"]:
                    p.grad = None  # views of the grad buffers (set again by every step's prepare_grads)
        storages: set[int] = set()
        for g in _grad_buffers(chunks):
            s = g.untyped_storage()
            if g.device.type != self.device or s.data_ptr() in storages or s.nbytes() == 0:
                continue
            storages.add(s.data_ptr())
            self._dropped.append((g, s.nbytes()))
            self.bytes["grads"] += s.nbytes()
            s.resize_(0)
        if self.pin:
            torch.cuda.synchronize()  # the host copies are complete before anything reads them
        self.offloaded = True
        return self.bytes

    def reload(self) -> None:
        """Everything back where `offload` found it: the state bit for bit, the gradient buffers zeroed."""
        if not self.offloaded:
            return
        for g, nbytes in self._dropped:
            g.untyped_storage().resize_(nbytes)
            g.zero_()
        for t, device in self._moved:
            back = torch.empty(t.shape, dtype=t.dtype, device=device)
            back.copy_(t.data, non_blocking=self.pin)
            t.data = back
        if self.pin:
            torch.cuda.synchronize()
        self._moved, self._dropped, self.offloaded = [], [], False


def _of(policy) -> StateOffload:
    off = getattr(policy, "rollout_offload", None)
    if off is None:
        off = policy.rollout_offload = StateOffload()
    return off


def _barrier() -> None:
    """Every GPU of a replica's engine freed before it wakes, or a rank's state back after it sleeps: the
    engine spans its replica's model-parallel ranks (rollout.tensor_parallel_size of them)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def before_generation(policy) -> None:
    """Before the engine starts or wakes, on every rank of its replica: the training state off the GPU (when
    `active`), and with a colocated sleeping engine the allocator's free blocks back to the driver (the
    engine's processes cannot use memory this one's cache holds). Nothing on CPU."""
    cfg = getattr(policy, "cfg", None)
    on = active(cfg)
    if on:
        _of(policy).offload(policy.chunks, policy.optimizer)
    if torch.cuda.is_available() and cfg is not None and cfg.rollout.enable_sleep_mode \
            and not cfg.rollout.engine_gpus:
        gc.collect()
        torch.cuda.empty_cache()
    if on:
        _barrier()


def after_generation(policy) -> None:
    """After the engine sleeps (every rank, once the engine rank has put it to sleep): the state back."""
    off = getattr(policy, "rollout_offload", None)
    if off is not None and off.offloaded:
        off.reload()


ensure_resident = after_generation  # what a train step calls first: never train on offloaded state
