"""Forward/backward of the policy on SequenceBatches: token log-probs, policy + lambda * verifier loss.

Single model-parallel rank for now (TP=PP=1): full-vocabulary logits are formed here. Vocab-parallel
log-probs (no gathered logits) arrive with the parallel trainer and the fused kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlv_megatron.algos.losses import policy_loss, verifier_loss
from rlv_megatron.config import AlgoConfig, VerifierConfig
from rlv_megatron.verifier import SequenceBatch


@dataclass
class Forward:
    logp: torch.Tensor  # [B, L] log-prob of each target at the sampling temperature
    answer_logits: torch.Tensor  # [B, V] logits at the verification answer position
    entropy: torch.Tensor  # scalar, mean over policy tokens (no grad)


def forward(model, batch: SequenceBatch, vocab: int, temperature: float) -> Forward:
    tokens = batch.tokens
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, positions, None)[..., :vocab].float()  # drop the padded vocab rows
    logprobs = torch.log_softmax(logits / temperature, -1)
    logp = logprobs.gather(-1, batch.targets[..., None])[..., 0]
    rows = torch.arange(len(batch))
    answer_logits = logits[rows, batch.verify_pos]
    with torch.no_grad():  # over every response token (the loss mask may drop filtered groups)
        m = batch.response_mask
        ent = -(logprobs.exp() * logprobs).sum(-1)
        entropy = (ent * m).sum() / m.sum().clamp(min=1)
    return Forward(logp, answer_logits, entropy)


@torch.no_grad()
def score(model, batch: SequenceBatch, vocab: int, temperature: float, yes_id: int, no_id: int | None = None):
    """Before an update: the targets' log-probs (PPO's old policy) and the verifier score at every answer
    position: P("Yes"), or renormalised over {Yes, No} when `no_id` is given (as verifier.yes_score)."""
    f = forward(model, batch, vocab, temperature)
    if no_id is None:
        return f.logp, torch.softmax(f.answer_logits, -1)[:, yes_id]
    return f.logp, torch.softmax(f.answer_logits[:, [yes_id, no_id]], -1)[:, 0]


def rlv_loss(model, batch: SequenceBatch, old_logp: torch.Tensor, vocab: int, algo: AlgoConfig,
             ver: VerifierConfig, yes_id: int, no_id: int, ref_logp: torch.Tensor | None = None):
    """loss = PPO-clip(policy tokens) + lambda * CE(Yes/No); returns (loss, metrics dict of floats)."""
    f = forward(model, batch, vocab, algo.temperature)
    pol = policy_loss(f.logp, old_logp, batch.advantages, batch.policy_mask, algo.clip_low, algo.clip_high,
                      algo.loss_agg, algo.max_tokens, batch.rollout_logp, algo.tis_cap, ref_logp, algo.kl_beta)
    loss = pol.loss
    metrics = {"loss/policy": pol.loss.item(), "policy/clip_fraction": pol.clip_fraction.item(),
               "policy/ratio_mean": pol.ratio_mean.item(), "policy/entropy": f.entropy.item(),
               "policy/kl_to_reference": pol.kl.item()}
    v = verifier_loss(f.answer_logits, batch.verify_label, yes_id, no_id, ver.loss, batch.verify_weight)
    metrics["loss/verifier"] = v.item()
    if ver.lam > 0:
        loss = loss + ver.lam * v
    metrics["loss/total"] = loss.item()
    return loss, metrics


def sft_loss(model, batch: SequenceBatch, vocab: int, yes_id: int, no_id: int, verifier_mode: str):
    """Warm start: token CE on the policy targets (correct traces) + CE on the verification answers."""
    f = forward(model, batch, vocab, 1.0)
    m = batch.policy_mask.float()
    token_ce = -(f.logp * m).sum() / m.sum().clamp(min=1)
    v = verifier_loss(f.answer_logits, batch.verify_label, yes_id, no_id, verifier_mode, batch.verify_weight)
    return token_ce + v, {"sft/token_ce": token_ce.item(), "sft/verifier_ce": v.item()}
