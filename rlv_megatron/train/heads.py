"""Where a loss gets its log-probabilities from: the last stage's output, either vocabulary-parallel logits
(`LogitsHead`, the model's own output layer) or the final hidden states with the output weight applied by
the fused chunked kernel (`FusedHead`, kernels/verifier_loss.py: the [tokens, V] logits never exist).

`emit_hidden_states` switches a GPTModel to the second: its output layer then returns its input, gathered as
the layer itself would (all-gathered over the sequence under sequence parallelism, copied into the TP region
otherwise), so the backward sums the hidden-state gradient over TP ranks exactly as the layer did.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kernels.verifier_loss import chunk_rows, fused_logprobs
from rlv_megatron.train.vocab_parallel import entropy, target_logprobs, tp_layout


@dataclass(frozen=True)
class FusedSpec:
    chunk_mb: float  # MiB of one fp32 logits chunk
    use_triton: bool | None  # None: Triton for CUDA tensors


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def emit_hidden_states(model: torch.nn.Module, spec: FusedSpec) -> None:
    """Make the last pipeline stage's output layer return hidden states [b, s, H] instead of logits."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)

    gpt = unwrap(model)
    layer = getattr(gpt, "output_layer", None)
    if layer is None:
        return  # not the last stage
    if getattr(gpt, "mtp_process", False):
        raise NotImplementedError("fused log-probs with multi-token prediction layers")

    def forward(input_, weight=None, runtime_gather_output=None):
        if layer.sequence_parallel:
            return gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True), None
        return copy_to_tensor_model_parallel_region(input_), None

    layer.forward = forward
    gpt.rlv_fused = spec


@contextmanager
def output_logits(model: torch.nn.Module):
    """Within the block, a model switched by `emit_hidden_states` returns logits again (tests, inspection)."""
    layer = unwrap(model).output_layer
    patched = layer.__dict__.pop("forward", None)
    try:
        yield model
    finally:
        if patched is not None:
            layer.forward = patched


def _only_where(fn, targets: torch.Tensor, where: torch.Tensor | None):
    """fn(flat row indices, their targets) -> (lp [n], ent [n] or None), spread to [b, s] with 0 elsewhere:
    log-probs only at the positions a loss uses (a prompt token costs no output-layer work)."""
    if where is None:
        return fn(None, targets)
    idx = where.reshape(-1).nonzero()[:, 0]
    lp, ent = fn(idx, targets.reshape(-1)[idx])

    def spread(v):
        return None if v is None else v.new_zeros(targets.numel()).index_copy(0, idx, v).view_as(targets)

    return spread(lp), spread(ent)


class LogitsHead:
    verifier = None  # no hidden states here: verifier.kind=head needs the fused path

    def __init__(self, logits: torch.Tensor, vocab: int):
        self.logits, self.vocab = logits, vocab

    def token_logprobs(self, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                       where: torch.Tensor | None = None):
        """(log p(target) at `temperature`, entropy or None), [b, s] each; only at `where` (0 elsewhere)."""
        def fn(idx, t):
            z = self.logits if idx is None else self.logits.reshape(-1, self.logits.shape[-1])[idx]
            z = z if temperature == 1.0 else z / temperature
            return target_logprobs(z, t, self.vocab), entropy(z.detach(), self.vocab) if with_entropy else None

        return _only_where(fn, targets, where)

    def answer_logprobs(self, at: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Log-probs [n, K] of ids [n, K] at the n positions where `at` is true (temperature 1)."""
        z = self.logits[at]
        return target_logprobs(z[:, None, :].expand(-1, ids.shape[1], -1), ids, self.vocab)


class FusedHead:
    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, vocab: int, spec: FusedSpec,
                 verifier: torch.nn.Module | None = None):
        self.hidden = hidden.to(weight.dtype)  # Float16Module hands the last stage's output back in fp32
        self.weight, self.vocab, self.spec = weight, vocab, spec
        self.verifier = verifier  # verifier.kind=head: the classification head (models/verifier_head.py)

    def verifier_logits(self, at: torch.Tensor) -> torch.Tensor:
        """[n] the classification head's logits at the n positions where `at` is true."""
        from rlv_megatron.models.verifier_head import logits

        return logits(self.verifier, self.hidden[at])

    def _run(self, h, targets, temperature):
        return fused_logprobs(h, self.weight, targets, self.vocab, temperature,
                              chunk_rows(self.weight.shape[0], self.spec.chunk_mb), self.spec.use_triton,
                              tp_layout()[0])

    def token_logprobs(self, targets, temperature=1.0, with_entropy=False, where=None):
        def fn(idx, t):
            h = self.hidden.reshape(-1, self.hidden.shape[-1])
            lp, ent = self._run(h if idx is None else h[idx], t.reshape(-1), temperature)
            lp = lp.view_as(t)
            return lp, ent.view_as(t) if with_entropy else None

        return _only_where(fn, targets, where)

    def answer_logprobs(self, at, ids):
        return self._run(self.hidden[at], ids, 1.0)[0]


def make_head(model: torch.nn.Module, output: torch.Tensor, vocab: int):
    gpt = unwrap(model)
    spec = getattr(gpt, "rlv_fused", None)
    if spec is None:
        return LogitsHead(output, vocab)
    tied = gpt.share_embeddings_and_output_weights  # else shared_embedding_or_output_weight() is the input's
    return FusedHead(output, gpt.shared_embedding_or_output_weight() if tied else gpt.output_layer.weight,
                     vocab, spec, getattr(gpt, "verifier_head", None))
