"""Micro-batches by a token budget: sequences packed end to end into rows (little padding waste), each
attending only to itself (a block-diagonal causal mask), or, unpacked, one right-padded sequence per row.

RoPE depends only on the distance between two tokens of a sequence, so a sequence packed at an offset gets
the same attention as at position 0: packed and unpacked losses agree to rounding (tested).
Every field is [rows, S]; `src` maps a token back to (sequence, target index) in the SequenceBatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlv_megatron.verifier import SequenceBatch


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [R, S] inputs
    attention_mask: torch.Tensor | None  # [R, 1, S, S] bool, True = masked (megatron's); None: causal
    seq: torch.Tensor  # [R, S] sequence index in the SequenceBatch, -1 on padding
    pos: torch.Tensor  # [R, S] target index within that sequence
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token values, [R, S], 0 on padding

    @property
    def num_tokens(self) -> int:
        return int((self.seq >= 0).sum())


def lengths(batch: SequenceBatch) -> list[int]:
    """Target positions each sequence uses: up to and including its Yes/No answer."""
    return (batch.verify_pos + 1).tolist()


def plan_rows(lens: list[int], budget: int, pack: bool, row_tokens: int = 0, min_count: int = 1
              ) -> list[list[list[int]]]:
    """Micro-batches -> rows -> sequence indices. Packed, rows of `row_tokens` (at least the longest sequence;
    0: the whole budget) take sequences first-fit, in order; unpacked, one each, as long as the longest.
    Micro-batches hold as many rows as fit in `budget` tokens, spread evenly over at least `min_count` of
    them (a pipeline needs one per stage; extra ones are empty). Rows shorter than the budget
    keep attention cost (quadratic in the row) low where there is no varlen attention (the local spec)."""
    longest = max(lens)
    if longest > budget:
        raise ValueError(f"train.micro_batch_tokens={budget}: a sequence of {longest} tokens does not fit")
    row_len = min(budget, max(longest, row_tokens or budget)) if pack else longest
    rows, used = [], []
    for i, n in enumerate(lens):
        for r, u in enumerate(used if pack else []):
            if u + n <= row_len:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    n_mb = max(-(-len(rows) // (budget // row_len)), min_count)
    per = -(-len(rows) // n_mb)
    plan = [rows[s:s + per] for s in range(0, len(rows), per)]
    return plan + [[] for _ in range(n_mb - len(plan))]


def block_causal_mask(seq: torch.Tensor) -> torch.Tensor:
    """[R, S] sequence ids (-1 = padding) -> [R, 1, S, S] True where attention is masked. Each token sees
    the earlier tokens of its own sequence (padding sees itself, so no softmax row is empty)."""
    S = seq.shape[-1]
    same = (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
    allowed = (same & torch.ones(S, S, dtype=torch.bool).tril()) | torch.eye(S, dtype=torch.bool)
    return ~allowed[:, None]


def micro_batches(batch: SequenceBatch, per_token: dict[str, torch.Tensor], batching, multiple_of: int = 1,
                  pad_id: int = 0, min_count: int = 1) -> list[MicroBatch]:
    """Split `batch` by `plan_rows` under `batching` (train.micro_batch_tokens, train.pack,
    train.pack_row_tokens); `per_token` tensors [B, L] are carried along as MicroBatch.fields.
    All micro-batches share one shape [R, S] (pipeline schedules need one), empty rows filling the last;
    S is a multiple of `multiple_of` (TP with sequence parallel)."""
    lens = lengths(batch)
    plan = plan_rows(lens, batching.micro_batch_tokens, batching.pack, batching.pack_row_tokens, min_count)
    S = max(sum(lens[i] for i in row) for rows in plan for row in rows)  # the first is never empty
    S = -(-S // multiple_of) * multiple_of
    R = max(len(rows) for rows in plan)
    out = []
    for rows in plan:
        tokens = torch.full((R, S), pad_id, dtype=torch.long)
        seq = torch.full((R, S), -1, dtype=torch.long)
        pos = torch.zeros((R, S), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lens[i]
                tokens[r, at:at + n] = batch.tokens[i, :n]
                seq[r, at:at + n] = i
                pos[r, at:at + n] = torch.arange(n)
                at += n
        valid = seq >= 0
        si, pi = seq.clamp(min=0), pos
        fields = {k: torch.where(valid, v[si, pi], torch.zeros((), dtype=v.dtype)) for k, v in per_token.items()}
        # one sequence per row, right-padded: megatron's own causal mask is exact
        mask = block_causal_mask(seq) if batching.pack else None
        out.append(MicroBatch(tokens, mask, seq, pos, fields))
    return out


def scatter_back(mbs: list[MicroBatch], values: list[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Per-token values [R, S] of each micro-batch -> [B, L] in the SequenceBatch layout (0 elsewhere)."""
    out = torch.zeros(shape, dtype=values[0].dtype)
    for mb, v in zip(mbs, values):
        valid = mb.seq >= 0
        out[mb.seq[valid], mb.pos[valid]] = v[valid]
    return out
