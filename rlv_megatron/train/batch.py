"""Training sequences for RL^V: one sequence per rollout carries both losses.

Under a causal mask, appending the verification turn after the response changes none of the response's
log-probs, so one forward pass over

    prompt | response (ends in its stop token) | verify suffix | "Yes"/"No"

gives the policy loss (response targets) and the verifier loss (the answer target) on the same rollout.
Inputs are the sequence minus its last token, targets the sequence shifted by one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from rlv_megatron.tasks.chat import ChatFormat


@dataclass
class SequenceBatch:
    tokens: torch.Tensor  # [B, L] inputs (right-padded with pad_id)
    targets: torch.Tensor  # [B, L]
    response_mask: torch.Tensor  # [B, L] bool: targets that are response tokens
    policy_mask: torch.Tensor  # [B, L] bool: the response targets the policy loss uses
    verify_pos: torch.Tensor  # [B] target index of the Yes/No answer; without a verification turn, of the last token
    verify_label: torch.Tensor  # [B] yes_id / no_id
    verify_weight: torch.Tensor  # [B] 1 for the verification examples the loss uses, else 0
    advantages: torch.Tensor  # [B]
    rollout_logp: torch.Tensor  # [B, L] engine's sampling log-probs at response targets (0 elsewhere)
    verify_turn: torch.Tensor | None = None  # [B] bool: the sequence carries the verification turn (None: all)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def has_verify(self) -> torch.Tensor:
        """[B] bool: which sequences end in a Yes/No answer at verify_pos."""
        return torch.ones(len(self), dtype=torch.bool) if self.verify_turn is None else self.verify_turn

    def select(self, idx: torch.Tensor) -> "SequenceBatch":
        return SequenceBatch(*(None if getattr(self, f) is None else getattr(self, f)[idx]
                               for f in self.__dataclass_fields__))


def yes_score(p_yes: float, p_no: float | None = None) -> float:
    """The verifier's score of one solution: raw P("Yes") (the paper's), or P(Yes) / (P(Yes) + P(No)) for a
    verifier trained two-way (`verifier.loss=yes_no`), whose other tokens keep arbitrary mass there."""
    if p_no is None:
        return p_yes
    total = p_yes + p_no
    return p_yes / total if total > 0 else 0.0


def verifier_selection(rewards: list[float], mode: str, rng: random.Random) -> list[bool]:
    """Which rollouts become verification examples: all, or class-balanced (majority class subsampled)."""
    if mode == "all":
        return [True] * len(rewards)
    if mode != "balanced":
        raise ValueError(f"verifier.examples={mode!r}: must be all or balanced")
    pos = [i for i, r in enumerate(rewards) if r >= 1.0]
    neg = [i for i, r in enumerate(rewards) if r < 1.0]
    keep = set(rng.sample(pos, min(len(pos), len(neg))) + rng.sample(neg, min(len(pos), len(neg))))
    return [i in keep for i in range(len(rewards))]


def build_sequences(fmt: ChatFormat, prompts: list[list[int]], responses: list[list[int]],
                    rewards: list[float], advantages: list[float], verify: list[bool], pad_id: int,
                    rollout_logps: list[list[float]] | None = None, policy: list[bool] | None = None,
                    verify_turn: bool = True) -> SequenceBatch:
    """Every sequence carries the verification turn (so P(Yes) on every rollout is one forward away);
    `verify` picks the ones the verifier loss uses, `policy` the ones the policy loss uses.
    verify_turn=False (lambda = 0 and no verifier metrics): prompt | response only, nothing to verify."""
    B = len(prompts)
    policy = [True] * B if policy is None else policy
    if verify_turn:
        seqs = [fmt.verify_ids(p, r) + [fmt.label_id(reward >= 1.0)] for p, r, reward in zip(prompts, responses, rewards)]
    else:
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        verify = [False] * B
    L = max(len(s) for s in seqs) - 1
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.full((B, L), pad_id, dtype=torch.long)
    response_mask = torch.zeros(B, L, dtype=torch.bool)
    rollout_logp = torch.zeros(B, L)
    for i, (s, p, r) in enumerate(zip(seqs, prompts, responses)):
        t = torch.tensor(s)
        tokens[i, :len(s) - 1] = t[:-1]
        targets[i, :len(s) - 1] = t[1:]
        first = len(p) - 1  # target index of the first response token
        response_mask[i, first:first + len(r)] = True
        if rollout_logps is not None:
            rollout_logp[i, first:first + len(r)] = torch.tensor(rollout_logps[i], dtype=torch.float32)
    policy_mask = response_mask & torch.tensor(policy)[:, None]
    return SequenceBatch(tokens, targets, response_mask, policy_mask,
                         verify_pos=torch.tensor([len(s) - 2 for s in seqs]),
                         verify_label=torch.tensor([s[-1] if verify_turn else pad_id for s in seqs]),
                         verify_weight=torch.tensor(verify, dtype=torch.float32),
                         advantages=torch.tensor(advantages, dtype=torch.float32), rollout_logp=rollout_logp,
                         verify_turn=None if verify_turn else torch.zeros(B, dtype=torch.bool))


def verification_batch(prompts: list[list[int]], answer_id: int, pad_id: int) -> SequenceBatch:
    """Verification inputs alone (prompt + response + verify suffix, as ChatFormat.verify_ids), each followed
    by `answer_id` as the answer target: scoring by the trainer's forward (no policy tokens, no losses)."""
    seqs = [list(p) + [answer_id] for p in prompts]
    B, L = len(seqs), max(len(s) for s in seqs) - 1
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.full((B, L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s) - 1] = torch.tensor(s[:-1])
        targets[i, :len(s) - 1] = torch.tensor(s[1:])
    none = torch.zeros(B, L, dtype=torch.bool)
    return SequenceBatch(tokens, targets, none, none, verify_pos=torch.tensor([len(s) - 2 for s in seqs]),
                         verify_label=torch.full((B,), answer_id), verify_weight=torch.zeros(B),
                         advantages=torch.zeros(B), rollout_logp=torch.zeros(B, L))
