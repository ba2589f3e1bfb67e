"""The policy's forward/backward on micro-batches, through megatron-core's pipeline schedules at any TP/PP/DP.

Losses take log-probabilities from a head (train/heads.py): by default the fused chunked kernel over the final
hidden states and the output weight (kernels/verifier_loss.py), else vocabulary-parallel logits
(train/vocab_parallel.py). They are written as per-token values times weights fixed for the whole
mini-batch (algos/losses.py), so the loss of a mini-batch is the plain sum
over its micro-batches and data-parallel ranks, whatever the split:

    RL^V:  sum_t w_t * ppo_t  +  lambda * sum_i u_i * CE_i(Yes/No)     u_i = verify weight / its global sum
    SFT:   sum_t w_t * (-logp_t)  +  sum_i u_i * CE_i

Megatron divides each micro-batch's loss by the number of micro-batches and DDP averages over data-parallel
ranks; `train_step` multiplies both back, so the gradient is that of the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rlv_megatron.algos.losses import Totals, aggregation_weights, ppo_terms, verifier_ce
from rlv_megatron.dist import all_reduce_host
from rlv_megatron.models.rope import rope_positions
from rlv_megatron.train.heads import make_head
from rlv_megatron.train.packing import MicroBatch, micro_batches, scatter_back
from rlv_megatron.train.batch import SequenceBatch


@dataclass
class Objective:
    """What a micro-batch's loss needs: the per-token fields to carry and the loss from a head (heads.py).
    `loss(head, mb)` -> (loss, summed statistics, per-token outputs [R, S] named in `outputs`)."""
    fields: dict[str, torch.Tensor]  # [B, L] per token
    loss: Callable[[object, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]]
    stats: tuple[str, ...]  # keys of the summed statistics the loss reports
    vocab: int  # real vocabulary size (Megatron pads the output layer past it)
    outputs: tuple[str, ...] = ()  # per-token values train_step hands back in the SequenceBatch layout


def _answer_logprobs(head, mb, yes_id, no_id):
    """Full-vocabulary log-probs of (label, Yes, No) at the verification answer positions, [n] each."""
    at = mb.fields["answer"] > 0
    label = mb.fields["target"][at].long()[:, None]
    lp = head.answer_logprobs(at, torch.cat([label, torch.tensor([yes_id, no_id], device=label.device).expand(len(label), 2)], 1))
    return at, lp[:, 0], lp[:, 1], lp[:, 2]


def verifier_terms(head, mb, yes_id: int, no_id: int, mode: str = "full", renormalise: bool = False):
    """At the verification answer positions `at`: (at, per-example loss [n], score [n]). The generative
    verifier: the label token's CE (verifier_ce by `mode`) and P("Yes"), over {Yes, No} when `renormalise`;
    a classification head (verifier.kind=head): the binary cross-entropy of its logit against label == Yes,
    and its sigmoid."""
    if head.verifier is not None:
        at = mb.fields["answer"] > 0
        z = head.verifier_logits(at)
        y = (mb.fields["target"][at].long() == yes_id).float()
        return at, F.binary_cross_entropy_with_logits(z, y, reduction="none"), torch.sigmoid(z)
    at, lp_label, lp_yes, lp_no = _answer_logprobs(head, mb, yes_id, no_id)
    return at, verifier_ce(lp_label, lp_yes, lp_no, mode), yes_score_from_logprobs(lp_yes,
                                                                                   lp_no if renormalise else None)


def token_fields(batch: SequenceBatch) -> dict[str, torch.Tensor]:
    """What every micro-batch carries: the targets, and 1 at each verification answer position."""
    answer = torch.zeros_like(batch.targets, dtype=torch.float32)
    answer[torch.arange(len(batch)), batch.verify_pos] = batch.has_verify.float()  # host: batches are built there
    return {"target": batch.targets.float(), "answer": answer}


def base_fields(batch: SequenceBatch, dp_group=None) -> dict[str, torch.Tensor]:
    fields = token_fields(batch)
    verify_w = torch.zeros_like(fields["answer"])
    total = batch.verify_weight.sum()
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        all_reduce_host(total, dp_group)
    verify_w[torch.arange(len(batch)), batch.verify_pos] = batch.verify_weight / total.clamp(min=1)  # host
    resp = batch.response_mask.float()
    return {**fields, "verify_w": verify_w,
            "resp_w": aggregation_weights("token_mean", resp, Totals.of(resp, dp_group))}


def rl_objective(batch: SequenceBatch, old_logp, algo, ver, vocab, yes_id, no_id, ref_logp=None,
                 dp_group=None, score_no_id=None) -> Objective:
    """`old_logp` None: the detached log-probs of this very forward (one update per batch: the ratio is
    exactly 1 and no scoring pass is needed); the objective then outputs them ("logp") and the verifier
    score at the answer positions ("score": P(Yes), over {Yes, No} with `score_no_id`)."""
    pol = batch.policy_mask.float()
    totals = Totals.of(pol, dp_group)
    fields = {**base_fields(batch, dp_group),
              "w": aggregation_weights(algo.loss_agg, pol, totals, algo.max_tokens),
              "tok_w": aggregation_weights("token_mean", pol, totals),
              "adv": batch.advantages[:, None].expand_as(pol).float(), "rollout_logp": batch.rollout_logp}
    if old_logp is not None:
        fields["old_logp"] = old_logp
    if ref_logp is not None:
        fields["ref_logp"] = ref_logp
    verifies = bool(batch.has_verify.any())

    def loss(head, mb):
        f = mb.fields
        on = f["resp_w"] > 0  # response tokens: the only log-probs a term reads (0 elsewhere)
        logp, ent = head.token_logprobs(f["target"].long(), algo.temperature, with_entropy=True, where=on)
        old = torch.where(on, f["old_logp"], 0.0) if old_logp is not None else logp.detach()  # ratio 1 elsewhere
        t = ppo_terms(logp, old, f["adv"], algo.clip_low, algo.clip_high, f["rollout_logp"],
                      algo.tis_cap, f.get("ref_logp"), algo.kl_beta, algo.off_policy)
        pol_loss = (t.loss * f["w"]).sum()
        ver_loss = pol_loss.new_zeros(())
        outputs = {}
        if old_logp is None:
            outputs["logp"] = logp.detach()
        if verifies:
            at, ce, p_yes = verifier_terms(head, mb, yes_id, no_id, ver.loss, renormalise=score_no_id is not None)
            ver_loss = (ce * f["verify_w"][at]).sum()
            if old_logp is None:
                score = torch.zeros_like(logp)
                score[at] = p_yes.detach()
                outputs["score"] = score
        total = pol_loss + ver.lam * ver_loss if ver.lam > 0 else pol_loss
        tw = f["tok_w"]
        stats = {"loss/total": total, "loss/policy": pol_loss, "loss/verifier": ver_loss,
                 "policy/clip_fraction": (t.clipped * tw).sum(), "policy/ratio_mean": (t.ratio * tw).sum(),
                 "policy/kl_to_reference": (t.kl * tw).sum(), "policy/is_weight_mean": (t.is_weight * tw).sum(),
                 "policy/entropy": (ent * f["resp_w"]).sum()}
        return total, stats, outputs

    return Objective(fields, loss, ("loss/total", "loss/policy", "loss/verifier", "policy/clip_fraction",
                                    "policy/ratio_mean", "policy/kl_to_reference", "policy/is_weight_mean",
                                    "policy/entropy"), vocab,
                     outputs=("logp", "score") if old_logp is None else ())


def sft_objective(batch: SequenceBatch, vocab, yes_id, no_id, verifier_mode, dp_group=None) -> Objective:
    pol = batch.policy_mask.float()
    fields = {**base_fields(batch, dp_group), "w": aggregation_weights("token_mean", pol, Totals.of(pol, dp_group))}

    def loss(head, mb):
        logp, _ = head.token_logprobs(mb.fields["target"].long(), where=mb.fields["w"] != 0)
        token_ce = -(logp * mb.fields["w"]).sum()
        at, ce, _ = verifier_terms(head, mb, yes_id, no_id, verifier_mode)
        ver_ce = (ce * mb.fields["verify_w"][at]).sum()
        return token_ce + ver_ce, {"sft/token_ce": token_ce, "sft/verifier_ce": ver_ce}, {}

    return Objective(fields, loss, ("sft/token_ce", "sft/verifier_ce"), vocab)


def run_schedule(chunks, mbs: list[MicroBatch], on_head, forward_only: bool, vocab: int) -> list | None:
    """megatron's forward(-backward) over the micro-batches; on the last pipeline stage, [on_head(head, mb)
    per micro-batch] (for training, each a (loss, stats) pair), elsewhere None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(chunks[0].parameters()).device

    def step(data_iterator, model):
        mb = next(data_iterator)
        if device.type != "cpu":  # micro-batches are built on the CPU
            mb = mb.to(device)
        # samples after a shared prompt sit at their own positions, not the row's (THD: megatron's rotary
        # restarts at each sequence)
        own = mb.pos if mb.shares_prompts else None
        with rope_positions(model, own):
            out = model(mb.tokens, mb.pos, mb.attention_mask, packed_seq_params=mb.packed_seq_params())
        if forward_only:
            return out, lambda output, non_loss_data=True: on_head(make_head(model, output, vocab), mb)
        return out, lambda output: on_head(make_head(model, output, vocab), mb)

    vpp = len(chunks)
    iters = [iter(mbs) for _ in range(vpp)] if vpp > 1 else iter(mbs)
    R, S = mbs[0].tokens.shape
    with torch.no_grad() if forward_only else torch.enable_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters, model=chunks if vpp > 1 else chunks[0],
            num_microbatches=len(mbs), seq_length=S, micro_batch_size=R,
            forward_only=forward_only, collect_non_loss_data=forward_only)
    return list(out) if ps.is_pipeline_last_stage(ignore_virtual=True) else None


def reduce_stats(values: list[dict] | None, keys: tuple[str, ...], dp_group, pp_group) -> dict[str, float]:
    """Sum per-micro-batch statistics, over data-parallel ranks, and share them with every pipeline stage."""
    t = torch.zeros(len(keys), dtype=torch.float64)  # host: reduced by all_reduce_host
    for v in values or []:
        t += torch.stack([v[k].detach().double().cpu() for k in keys])
    for g in (pp_group, dp_group):
        if g is not None and dist.get_world_size(g) > 1:
            all_reduce_host(t, g)
    return dict(zip(keys, t.tolist()))


def yes_score_from_logprobs(lp_yes: torch.Tensor, lp_no: torch.Tensor | None = None) -> torch.Tensor:
    """verifier.yes_score on tensors of full-vocabulary log-probs."""
    return lp_yes.exp() if lp_no is None else (lp_yes - torch.logaddexp(lp_yes, lp_no)).exp()


def score_micro_batches(chunks, mbs, vocab, temperature, yes_id, no_id=None):
    """Per token, the target's log-prob at `temperature`; at answer positions, the verifier score: P("Yes"),
    or renormalised over {Yes, No} when `no_id` is given (as verifier.yes_score)."""
    def on_head(head, mb):
        logp, _ = head.token_logprobs(mb.fields["target"].long(), temperature)
        at, _, p_yes = verifier_terms(head, mb, yes_id, yes_id if no_id is None else no_id,
                                      renormalise=no_id is not None)
        score = torch.zeros_like(logp)
        score[at] = p_yes
        return logp, score

    return run_schedule(chunks, mbs, on_head, forward_only=True, vocab=vocab)


def score(chunks, batch: SequenceBatch, vocab, temperature, yes_id, no_id=None, batching=None, groups=None):
    """(old log-probs [B, L], verifier score [B]) for a SequenceBatch, on every rank of the model-parallel
    group (broadcast from the last pipeline stage). `batching`: train config fields (default: one row each)."""
    groups = groups or Groups.current()
    batching = batching or _ONE_ROW_EACH
    mbs = micro_batches(batch, token_fields(batch), batching, groups.seq_multiple, min_count=groups.pp_size)
    out = score_micro_batches(chunks, mbs, vocab, temperature, yes_id, no_id)
    logp, scores = batch_layout(mbs, None if out is None else [list(o) for o in out], 2,
                                tuple(batch.targets.shape), groups.pp)
    return logp, scores[torch.arange(len(batch)), batch.verify_pos]  # host


def batch_layout(mbs: list[MicroBatch], values: list[list[torch.Tensor]] | None, count: int, shape, pp_group
                 ) -> list[torch.Tensor]:
    """`count` per-token values of each micro-batch ([R, S], on the last pipeline stage; None elsewhere) ->
    `count` tensors [B, L] in the SequenceBatch layout, on every pipeline stage."""
    both = torch.zeros((count,) + tuple(shape))  # host, like the SequenceBatch
    if values is not None:
        for k in range(count):
            both[k] = scatter_back(mbs, [v[k].cpu() for v in values], shape)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        all_reduce_host(both, pp_group)  # only the last stage holds non-zeros
    return list(both)


_ONE_ROW_EACH = SimpleNamespace(micro_batch_tokens=1 << 30, pack=False, share_prompts=False)


@dataclass
class Groups:
    dp: object = None
    pp: object = None
    seq_multiple: int = 1  # sequence length multiple (packing.seq_multiple: TP under sequence parallel, FP8)
    pp_size: int = 1  # at least this many micro-batches

    @staticmethod
    def current(sequence_parallel: bool = False, fp8: str | None = None, fp8_recipe: str = "delayed") -> "Groups":
        from megatron.core import parallel_state as ps

        from rlv_megatron.train.packing import seq_multiple

        if not ps.model_parallel_is_initialized():
            return Groups(seq_multiple=seq_multiple(1, False, fp8, fp8_recipe))
        return Groups(ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group(),
                      seq_multiple(ps.get_tensor_model_parallel_world_size(), sequence_parallel, fp8, fp8_recipe),
                      ps.get_pipeline_model_parallel_world_size())
