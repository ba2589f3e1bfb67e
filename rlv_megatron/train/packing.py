"""Micro-batches by a token budget: sequences packed end to end (THD: one row per micro-batch, little
padding waste), each attending only to itself, or, unpacked, one right-padded sequence per row (megatron's
causal mask).

Packed micro-batches carry megatron's PackedSeqParams (`cu_seqlens`: where each sequence starts), consumed by
TransformerEngine's THD attention on GPU and by `models.varlen` on the local spec: attention per sequence, no
[T, T] mask. RoPE restarts at each sequence (megatron's THD rotary), so packed and unpacked losses agree to
rounding (tested). Padding at the end of a row is split into pseudo-sequences no longer than the longest
real one, so it costs no more attention per token than real tokens.

Shared prompts (`train.share_prompts`): the G samples of one prompt are laid out as one unit,
`prompt[:-1] | last prompt token + sample 1 | ... | last prompt token + sample G`, each sample attending to
the shared part (its segment's prefix) and to itself, at its own RoPE positions (`pos`). The shared tokens
are computed once instead of G times and their gradient is the sum of the G copies': the same loss and
gradient to rounding, because every loss weights only response and answer targets, which all lie after
the shared part. The local spec only (`models.segments`' layout); THD cannot express a shared prefix.

Every field is [rows, S]; `seq` and `pos` map a token back to (sequence, target index) in the SequenceBatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlv_megatron.models.segments import Segment, encode
from rlv_megatron.train.batch import SequenceBatch


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [R, S] inputs
    attention_mask: torch.Tensor | None  # models.segments' layout (shared prompts); None: causal or THD
    seq: torch.Tensor  # [R, S] sequence index in the SequenceBatch, -1 on padding (shared tokens: the first's)
    pos: torch.Tensor  # [R, S] target index within that sequence (= the input's position)
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token values, [R, S], 0 on padding
    shares_prompts: bool = False  # some rows hold shared prompts: RoPE must read `pos`, not the row offset
    cu_seqlens: torch.Tensor | None = None  # THD (R = 1): int32 [sequences + 1] boundaries, padding included

    @property
    def num_tokens(self) -> int:
        return int((self.seq >= 0).sum())

    def packed_seq_params(self):
        """megatron's PackedSeqParams of a THD micro-batch (None otherwise)."""
        if self.cu_seqlens is None:
            return None
        from megatron.core.packed_seq_params import PackedSeqParams

        longest = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=longest, max_seqlen_kv=longest)

    def to(self, device) -> "MicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.tokens), move(self.attention_mask), move(self.seq), move(self.pos),
                          {k: move(v) for k, v in self.fields.items()}, self.shares_prompts, move(self.cu_seqlens))


@dataclass
class Unit:
    """Sequences laid out together: the first `shared` inputs once, then each member's remaining inputs."""
    members: list[int]
    shared: int = 0


def lengths(batch: SequenceBatch) -> list[int]:
    """Target positions each sequence uses: up to and including its Yes/No answer."""
    return (batch.verify_pos + 1).tolist()


def prompt_units(batch: SequenceBatch, lens: list[int], share: bool, budget: int) -> list[Unit]:
    """One unit per sequence, or (share) one per prompt shared by several sequences: their inputs before the
    last prompt token, which are the same tokens with the same (zero-weight) targets. A unit longer than
    `budget` is split into several, each with its own copy of the shared part."""
    if not share:
        return [Unit([i]) for i in range(len(lens))]
    has_resp = batch.response_mask.any(1)
    first = batch.response_mask.float().argmax(1)  # target index of the first response token = |prompt| - 1
    by_prompt: dict[tuple, list[int]] = {}
    for i in range(len(lens)):
        key = tuple(batch.tokens[i, :int(first[i]) + 1].tolist()) if has_resp[i] else ("alone", i)
        by_prompt.setdefault(key, []).append(i)
    units = []
    for members in by_prompt.values():
        shared = int(first[members[0]]) if len(members) > 1 else 0
        chunks = [[]]
        for i in members:
            if chunks[-1] and unit_length(Unit(chunks[-1] + [i], shared), lens) > budget:
                chunks.append([])
            chunks[-1].append(i)
        units += [Unit(c, shared if len(c) > 1 else 0) for c in chunks]
    return sorted(units, key=lambda u: u.members[0])


def unit_length(unit: Unit, lens: list[int]) -> int:
    return unit.shared + sum(lens[m] - unit.shared for m in unit.members)


def computed_tokens(batch: SequenceBatch, batching) -> int:
    """Tokens one forward over `batch` computes under `batching` (padding left out): its sequence tokens less,
    under train.share_prompts, the prompt copies not computed."""
    lens = lengths(batch)
    units = prompt_units(batch, lens, batching.share_prompts, batching.micro_batch_tokens)
    return sum(unit_length(u, lens) for u in units)


def plan_rows(lens: list[int], budget: int, pack: bool, min_count: int = 1, fixed_shape: bool = True
              ) -> list[list[list[int]]]:
    """Micro-batches -> rows -> unit indices, for units of `lens` tokens. Packed, rows of the whole budget
    take units first-fit, in order (one row per micro-batch); unpacked, one unit per row.
    fixed_shape (pipelines need one [R, S] for all): every row as long as the longest, as many rows per
    micro-batch as fit in `budget`, spread evenly over at least `min_count` micro-batches (one per stage;
    extra ones are empty). Otherwise rows go longest first into micro-batches of their own [R, S] while R
    times the first row's length fits in `budget`: little padding."""
    longest = max(lens)
    if longest > budget:
        raise ValueError(f"train.micro_batch_tokens={budget}: a sequence of {longest} tokens does not fit")
    row_len = budget if pack else longest
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
    if not fixed_shape:
        plan: list[list[list[int]]] = []
        for r in sorted(range(len(rows)), key=lambda r: -used[r]):
            if plan and (len(plan[-1]) + 1) * sum(lens[i] for i in plan[-1][0]) <= budget:
                plan[-1].append(rows[r])
            else:
                plan.append([rows[r]])
        return plan + [[] for _ in range(min_count - len(plan))]
    n_mb = max(-(-len(rows) // (budget // row_len)), min_count)
    per = -(-len(rows) // n_mb)
    plan = [rows[s:s + per] for s in range(0, len(rows), per)]
    return plan + [[] for _ in range(n_mb - len(plan))]


# FP8 GEMMs (model.fp8, TransformerEngine). TE checks every FP8 GEMM's input with assert_dim_for_fp8_exec
# (transformer_engine/pytorch/utils.py, read at v2.11, the version docker/pins.txt installs; the same rule from
# v2.4 through v2.18 and main, 2.20.0.dev0): "FP8 execution requires the product of all dimensions except the
# last to be divisible by 8 and the last dimension to be divisible by 16".
# The leading dimensions are the tokens: rows x sequence, and under sequence parallel the rank's own share,
# S / TP x rows, because module/linear.py checks the input before its all-gather. The weight-gradient GEMM
# contracts over the tokens, which makes them the last (16) dimension of its operands: Megatron aligns FP8 token
# counts to 16 for this (megatron/core/fp8_utils.py get_fp8_align_size), and MXFP8 to 32 (TE's
# MXFP8Quantizer.is_quantizable: both dimensions multiples of MXFP8_BLOCK_SCALING_SIZE = 32).
def fp8_token_multiple(fp8: str | None, fp8_recipe: str = "delayed") -> int:
    """What every FP8 GEMM's token count must be a multiple of (1 without FP8)."""
    if fp8 is None:
        return 1
    return 32 if fp8_recipe == "mxfp8" else 16


def seq_multiple(tp: int, sequence_parallel: bool, fp8: str | None = None, fp8_recipe: str = "delayed") -> int:
    """The multiple of S of every micro-batch [R, S]: TP under sequence parallel (the sequence is scattered
    over the TP ranks), and under FP8 so that each rank's tokens, S (/ TP) x R for any R, are a multiple of
    fp8_token_multiple (packed THD micro-batches have R = 1: S alone must do it)."""
    shards = tp if sequence_parallel else 1
    return shards * fp8_token_multiple(fp8, fp8_recipe)


def micro_batches(batch: SequenceBatch, per_token: dict[str, torch.Tensor], batching, multiple_of: int = 1,
                  pad_id: int = 0, min_count: int = 1) -> list[MicroBatch]:
    """Split `batch` by `plan_rows` under `batching` (train.micro_batch_tokens, train.pack,
    train.share_prompts); `per_token` tensors [B, L] are carried along as
    MicroBatch.fields. Under a pipeline (min_count > 1) all micro-batches share one shape [R, S], empty
    rows filling the last; without one each has its own. S is a multiple of `multiple_of` (`seq_multiple`:
    TP with sequence parallel, and the FP8 GEMMs' token multiple)."""
    lens = lengths(batch)
    budget = batching.micro_batch_tokens
    units = prompt_units(batch, lens, batching.share_prompts, budget)
    unit_lens = [unit_length(u, lens) for u in units]
    plan = plan_rows(unit_lens, budget, batching.pack, min_count, fixed_shape=min_count > 1)
    row_len = lambda row: sum(unit_lens[u] for u in row)  # noqa: E731
    round_up = lambda n: -(-n // multiple_of) * multiple_of  # noqa: E731
    S_all = round_up(max(row_len(row) for rows in plan for row in rows))  # the first is never empty
    R_all = max(len(rows) for rows in plan)
    out = []
    for rows in plan:
        R, S = (R_all, S_all) if min_count > 1 else (len(rows), round_up(max(map(row_len, rows))))
        tokens = torch.full((R, S), pad_id, dtype=torch.long)  # host: run_schedule moves each to the device
        seq = torch.full((R, S), -1, dtype=torch.long)  # host
        pos = torch.zeros((R, S), dtype=torch.long)  # host
        segments = []
        for r, row in enumerate(rows):
            at = 0
            for u in row:
                unit = units[u]
                spans = [(unit.members[0], 0, unit.shared)] if unit.shared else []
                spans += [(i, unit.shared, lens[i]) for i in unit.members]
                prefix = (at, at + unit.shared)  # the members see the shared span, laid out first
                for i, lo, hi in spans:
                    n = hi - lo
                    tokens[r, at:at + n] = batch.tokens[i, lo:hi]
                    seq[r, at:at + n], pos[r, at:at + n] = i, torch.arange(lo, hi)  # host
                    segments.append(Segment(r, at, at + n, *(prefix if lo and unit.shared else (0, 0))))
                    at += n
        valid = seq >= 0
        si, pi = seq.clamp(min=0), pos
        fields = {k: torch.where(valid, v[si, pi], torch.zeros((), dtype=v.dtype))  # host
                  for k, v in per_token.items()}
        shares = any(s.prefix_end for s in segments)
        # one sequence per row, right-padded: megatron's own causal mask is exact
        thd = batching.pack and not shares
        mask = encode(segments, R) if shares else None
        out.append(MicroBatch(tokens, mask, seq, pos, fields, shares, thd_boundaries(segments, S) if thd else None))
    return out


def thd_boundaries(segments: list[Segment], S: int) -> torch.Tensor:
    """cu_seqlens (int32) of one packed row: its sequences in order, then the padding to S as pseudo-sequences
    no longer than the longest sequence (attention costs no more per padding token than per real one)."""
    assert all(s.row == 0 for s in segments), "THD micro-batches hold one row"
    ends = [s.end for s in segments]
    piece = max((s.end - s.start for s in segments), default=min(S, 128))
    at = ends[-1] if ends else 0
    while at < S:
        at = min(at + piece, S)
        ends.append(at)
    return torch.tensor([0] + ends, dtype=torch.int32)  # host


def scatter_back(mbs: list[MicroBatch], values: list[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Per-token values [R, S] of each micro-batch -> [B, L] in the SequenceBatch layout (0 elsewhere).
    A shared prompt's values land on its first sequence only (no loss reads them)."""
    out = torch.zeros(shape, dtype=values[0].dtype)  # host, like the SequenceBatch
    for mb, v in zip(mbs, values):
        valid = mb.seq >= 0
        out[mb.seq[valid], mb.pos[valid]] = v[valid]
    return out
