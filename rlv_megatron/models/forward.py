"""Forward passes through a (possibly pipelined) policy using megatron-core's own schedules."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch


def positions_like(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """[.., V/tp] -> [.., V]: the full vocabulary (tests and small models only; training stays sharded)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def forward_only(chunks: list[torch.nn.Module], micro_batches: list[torch.Tensor],
                 on_logits: Callable[[torch.Tensor], object] = gather_vocab) -> list | None:
    """Run token micro-batches [b, s] through the model; on the last pipeline stage return
    [on_logits(logits) per micro-batch], elsewhere None. Collective over the model-parallel group."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq_len, mbs = micro_batches[0].shape[1], micro_batches[0].shape[0]
    for mb in micro_batches:
        if tuple(mb.shape) != (mbs, seq_len):
            raise ValueError(f"micro-batches must share one shape, got {tuple(mb.shape)} and {(mbs, seq_len)}")

    def step(data_iterator, model):
        tokens = next(data_iterator)
        out = model(tokens, positions_like(tokens), None)

        def collect(output, non_loss_data=False):
            return on_logits(output)

        return out, partial(collect)

    vpp = len(chunks)
    iters = [iter(micro_batches) for _ in range(vpp)] if vpp > 1 else iter(micro_batches)
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters, model=chunks if vpp > 1 else chunks[0],
            num_microbatches=len(micro_batches), seq_length=seq_len, micro_batch_size=mbs,
            forward_only=True, collect_non_loss_data=True)
    return list(outputs) if ps.is_pipeline_last_stage(ignore_virtual=True) else None
