"""Advantage estimators and losses against hand-computed values."""

import math

import pytest
import torch

from rlv_megatron.algos.advantages import compute_advantages, informative_groups
from rlv_megatron.algos.losses import aggregate, policy_loss, verifier_loss

# two groups of different sizes, interleaved, plus a group of one
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 2])


def test_grpo_by_hand():
    adv = compute_advantages("grpo", REWARDS, GROUPS)
    m0, s0 = 2 / 3, math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)  # unbiased std of [1, 0, 1]
    expect = [(1 - m0) / s0, (0 - m0) / s0, (1 - m0) / s0, 0.0, 0.0, 0.0]  # all-equal group and singleton: 0
    assert adv.tolist() == pytest.approx(expect, abs=1e-5)


def test_rloo_is_leave_one_out():
    adv = compute_advantages("rloo", REWARDS, GROUPS)
    expect = [1 - 0.5, 0 - 1.0, 1 - 0.5, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expect, abs=1e-6)


def test_dr_grpo_is_centered_only():
    adv = compute_advantages("dr_grpo", REWARDS, GROUPS)
    assert adv.tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3, 0.0, 0.0, 0.0], abs=1e-6)


def test_unknown_estimator_is_named():
    with pytest.raises(ValueError, match="algo.advantage='ppo'"):
        compute_advantages("ppo", REWARDS, GROUPS)


def test_informative_groups():
    assert informative_groups(REWARDS, GROUPS).tolist() == [True, True, True, False, False, False]


def test_ppo_clip_per_token_by_hand():
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    old = torch.zeros(1, 3)
    mask = torch.tensor([[True, True, False]])
    # A = +1: ratio 1.5 clipped to 1.2 -> -1.2; ratio 0.5 -> min(0.5, 0.8) = 0.5 -> -0.5
    out = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2)
    assert out.loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    # A = -1: min(-1.5, -1.2) = -1.5 -> 1.5; min(-0.5, -0.8) = -0.8 -> 0.8; separate low/high clip
    out = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.3)
    assert out.loss.item() == pytest.approx((1.5 + 0.8) / 2)


def test_aggregations_with_masked_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate("token_mean", values, mask).item() == pytest.approx((1 + 2 + 4) / 3)
    assert aggregate("seq_mean", values, mask).item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate("constant", values, mask, constant=4).item() == pytest.approx((1 + 2 + 4) / (2 * 4))
    assert aggregate("token_mean", values, torch.zeros_like(mask)).item() == 0.0  # empty mask: no NaN


def test_truncated_importance_weight_and_k3_kl():
    logp = torch.tensor([[math.log(0.5)]])
    old = logp.clone()
    rollout = torch.tensor([[math.log(0.1)]])  # engine much less likely: weight 5 capped at 2
    mask = torch.ones(1, 1, dtype=torch.bool)
    out = policy_loss(logp, old, torch.tensor([1.0]), mask, rollout_logp=rollout, tis_cap=2.0)
    assert out.loss.item() == pytest.approx(-2.0)
    ref = torch.tensor([[math.log(0.25)]])
    out = policy_loss(logp, old, torch.tensor([0.0]), mask, ref_logp=ref, kl_beta=0.1)
    d = math.log(0.25) - math.log(0.5)
    assert out.kl.item() == pytest.approx(math.exp(d) - d - 1)
    assert out.loss.item() == pytest.approx(0.1 * (math.exp(d) - d - 1))


def test_off_policy_corrections_by_hand():
    """algo.off_policy against its formula (algos/losses.py), one token, A = +1 and -1."""
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    old = torch.tensor([[math.log(0.5)]])
    mask = torch.ones(1, 1, dtype=torch.bool)

    def loss(rollout_p, adv, off_policy, cap=2.0):
        out = policy_loss(logp, old, torch.tensor([adv]), mask, rollout_logp=torch.tensor([[math.log(rollout_p)]]),
                          tis_cap=cap, off_policy=off_policy)
        (grad,) = torch.autograd.grad(out.loss, logp)
        return out.loss.item(), grad.item()

    # w = p_old / p_rollout: 5 (past the cap of 2) or 1.25 (under it); the ratio against old is 1
    assert loss(0.1, 1.0, "truncated_is") == pytest.approx((-2.0, -2.0))
    assert loss(0.4, 1.0, "truncated_is") == pytest.approx((-1.25, -1.25))
    assert loss(0.1, 1.0, "masked_is") == pytest.approx((0.0, 0.0))  # dropped, not truncated
    assert loss(0.4, 1.0, "masked_is") == pytest.approx((-1.25, -1.25))
    assert loss(0.4, 1.0, "truncated_is", cap=None) == pytest.approx((-1.0, -1.0))  # no correction
    # behaviour_ratio: ratio = 0.5 / 0.25 = 2 against the engine, clipped at 1.2 for A > 0 (no gradient),
    # unclipped for A < 0: loss -min(-2, -1.2) = 2, d/dlogp = ratio x 1 = 2; the cap plays no part
    assert loss(0.25, 1.0, "behaviour_ratio") == pytest.approx((-1.2, 0.0))
    assert loss(0.25, -1.0, "behaviour_ratio") == pytest.approx((2.0, 2.0))
    assert loss(0.25, -1.0, "behaviour_ratio", cap=None) == pytest.approx((2.0, 2.0))
    # within the trust region it is the plain policy gradient of the ratio: 0.5 / 0.45
    assert loss(0.45, 1.0, "behaviour_ratio") == pytest.approx((-0.5 / 0.45, -0.5 / 0.45))


def test_verifier_loss_modes_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 1])  # yes_id = 0, no_id = 1
    full = verifier_loss(logits, labels, 0, 1, "full")
    expect_full = (-torch.log_softmax(logits[0], 0)[0] - torch.log_softmax(logits[1], 0)[1]) / 2
    assert full.item() == pytest.approx(expect_full.item())
    two = verifier_loss(logits, labels, 0, 1, "yes_no")
    expect_two = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-3))) / 2
    assert two.item() == pytest.approx(expect_two)
    weighted = verifier_loss(logits, labels, 0, 1, "yes_no", weight=torch.tensor([1.0, 0.0]))
    assert weighted.item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_yes_score_raw_or_renormalised_over_yes_and_no():
    from rlv_megatron.train.batch import yes_score

    assert yes_score(0.02) == 0.02  # the paper's raw P(Yes)
    assert yes_score(0.02, 0.06) == pytest.approx(0.25)  # a two-way verifier: P(Yes | Yes or No)
    assert yes_score(0.0, 0.0) == 0.0  # neither in the engine's top-k


def test_two_way_score_equals_yes_score_of_the_softmax():
    from rlv_megatron.train.step import yes_score_from_logprobs
    from rlv_megatron.train.batch import yes_score

    logits = torch.tensor([[2.0, 0.5, -1.0, 3.0], [0.0, 1.0, 4.0, -2.0]])
    lp = torch.log_softmax(logits, -1)
    probs = lp.exp()
    assert torch.allclose(yes_score_from_logprobs(lp[:, 1]), probs[:, 1])
    two = yes_score_from_logprobs(lp[:, 1], lp[:, 2])
    for i in range(2):
        assert two[i].item() == pytest.approx(yes_score(probs[i, 1].item(), probs[i, 2].item()), rel=1e-6)
