"""The classification-head verifier (verifier.kind=head): its loss and score against the formulas, training,
checkpoint, export and the scores of an exported model; the config's refusals."""

import subprocess
import sys

import pytest
import torch

from tests.distributed import run_distributed

YES, NO = 5, 6  # the subset-sum tokenizer's "Yes" and "No"


def _head_scenario(tmp):
    from rlv_megatron.config import Config
    from rlv_megatron.models.verifier_head import HEAD_FILE, find
    from rlv_megatron.run import scratch_arch
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.tasks.registry import make_task
    from rlv_megatron.train import checkpoint
    from rlv_megatron.train.batch import build_sequences
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train.step import sft_objective

    cfg = Config()
    cfg.verifier.kind = "head"
    cfg.optim.lr = 1e-2
    task = make_task(cfg.task, cfg.verifier.question, num_eval=8)
    fmt = ChatFormat(task.tokenizer, cfg.verifier.question)
    assert (fmt.yes_id, fmt.no_id) == (YES, NO)
    policy = Policy(cfg, scratch_arch(cfg, len(task.tokenizer), task.tokenizer))
    head = find(policy.model_chunks)
    out = {"fresh": (head.weight.abs().max().item(), head.bias.item())}
    # verification examples: a correct solution ("Yes") and three wrong ones ("No") per problem
    prompts, responses, rewards = [], [], []
    for p in task.eval:
        nums = [int(x) for x in p.answer.split(",")]
        good = "+".join(map(str, nums[:2])) + f"={sum(nums[:2])}"
        for text, r in ((good, 1.0), ("1+2=3", 0.0), ("9+9=99", 0.0), (good + "0", 0.0)):
            prompts.append(fmt.prompt_ids(p.prompt))
            responses.append(task.tokenizer.encode(text, add_special_tokens=False))
            rewards.append(r)
    batch = build_sequences(fmt, prompts, responses, rewards, [0.0] * len(rewards), [True] * len(rewards),
                            task.tokenizer.pad_token_id)
    verify = [fmt.verify_ids(p, r) for p, r in zip(prompts, responses)]
    scores0 = policy.score_yes(verify, YES, NO)
    losses = [policy.train_step(batch, sft_objective(batch, policy.vocab, YES, NO, "full"))["sft/verifier_ce"]
              for _ in range(30)]
    scores = policy.score_yes(verify, YES, NO)
    # the head's sigmoid and BCE by hand, from the final hidden states
    from rlv_megatron.train.heads import unwrap
    from rlv_megatron.train.packing import micro_batches
    from rlv_megatron.train.step import run_schedule, token_fields, verifier_terms

    mbs = micro_batches(batch, token_fields(batch), cfg.train)

    def by_hand(h, mb):
        at, bce, p = verifier_terms(h, mb, YES, NO)
        hidden = h.hidden[at].float()
        z = hidden @ head.weight.float()[0] + head.bias.float()
        y = (mb.fields["target"][at] == YES).float()
        ref = -(y * torch.nn.functional.logsigmoid(z) + (1 - y) * torch.nn.functional.logsigmoid(-z))
        return (bce - ref).abs().max(), (p - torch.sigmoid(z)).abs().max()

    out["by_hand"] = [tuple(float(v) for v in r) for r in
                      run_schedule(policy.chunks, mbs, lambda h, mb: by_hand(h, mb), True, policy.vocab)]
    assert unwrap(policy.chunks[0]).verifier_head is head
    out.update(scores0=scores0, scores=scores, rewards=rewards, losses=losses)
    # checkpoint round trip: a fresh policy gets the trained head back, and the same scores
    checkpoint.save(policy, f"{tmp}/ckpt", 1, {"phase": "sft"})
    other = Policy(cfg, policy.arch)
    checkpoint.load(other, checkpoint.latest(f"{tmp}/ckpt"))
    out["ckpt_scores"] = other.score_yes(verify, YES, NO)
    # export: verifier_head.pt beside the HF files; a Policy from the export scores the same
    exported = policy.export(f"{tmp}/export", task.tokenizer)
    out["files"] = sorted(p.name for p in exported.iterdir())
    cfg2 = Config()
    cfg2.verifier.kind, cfg2.model.path = "head", str(exported)
    out["export_scores"] = Policy(cfg2).score_yes(verify, YES, NO)
    out["head_file"] = HEAD_FILE
    # `rlv eval` of the export scores by the same forward; a generative export leaves scoring to the engine
    from pathlib import Path

    from rlv_megatron.eval.app import head_scorer

    out["rlv_eval_scores"] = head_scorer(Config(), exported).score_yes(verify, YES, NO)
    cfg3 = Config()
    plain = Policy(cfg3, policy.arch).export(f"{tmp}/plain", task.tokenizer)
    out["plain_scorer"] = head_scorer(cfg3, Path(plain))
    task.close()
    return out


@pytest.mark.slow
def test_head_trains_checkpoints_exports_and_scores(tmp_path):
    out = run_distributed(_head_scenario, 1, str(tmp_path))[0]
    assert out["fresh"] == (0.0, 0.0)  # a new head scores 0.5 everywhere
    assert out["scores0"] == pytest.approx([0.5] * len(out["scores0"]))
    for bce_err, p_err in out["by_hand"]:
        assert bce_err < 1e-5 and p_err < 1e-6
    assert out["losses"][-1] < 0.5 * out["losses"][0]  # it learns the labels
    right = [s if r else 1 - s for s, r in zip(out["scores"], out["rewards"])]
    assert sum(right) / len(right) > 0.6
    assert out["ckpt_scores"] == pytest.approx(out["scores"], abs=1e-6)
    assert out["head_file"] in out["files"] and "model.safetensors" in out["files"]
    assert out["export_scores"] == pytest.approx(out["scores"], abs=1e-6)
    assert out["rlv_eval_scores"] == pytest.approx(out["scores"], abs=1e-6) and out["plain_scorer"] is None
    # `rlv export` of the checkpoint (the run's start/ has a head): the trained head comes out too
    done = subprocess.run([sys.executable, "-m", "rlv_megatron.cli", "export", str(tmp_path / "ckpt"),
                           str(tmp_path / "again"), "--model", str(tmp_path / "export")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / out["head_file"], weights_only=True) for d in ("export", "again"))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["weight"].abs().max() > 0


@pytest.mark.parametrize("overrides, message", [
    (["train.logprob_impl=logits"], "needs train.logprob_impl=fused"),
    (["parallel.tp=2"], "parallel.tp=2, parallel.pp=1: its pools are scored by the trainer's forward"),
])
def test_head_config_refusals(overrides, message):
    from rlv_megatron.config import Config, ConfigError, apply_overrides, validate

    cfg = apply_overrides(Config(), ["verifier.kind=head", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
