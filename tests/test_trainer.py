"""Two RL^V steps end to end on CPU: the losses are finite, the weights move, the engine follows them."""

import math

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.slow


class CallOrder:
    """The engine, with a log of the loop's calls to it (reading a plain attribute is no call)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        value = getattr(self.engine, name)
        if callable(value):
            self.calls.append(name)
        return value


def _two_steps(out_dir):
    from rlv_megatron.config import Config
    from rlv_megatron.dashboards import Metrics
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.rollout.engine import make_engine
    from rlv_megatron.run import scratch_arch
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.tasks.registry import make_task
    from rlv_megatron.train.loop import rl_step
    from rlv_megatron.train.heads import output_logits

    cfg = Config()
    cfg.rollout.dtype, cfg.rollout.max_model_len = "float32", 128
    cfg.algo.prompts_per_step, cfg.algo.group_size, cfg.algo.max_tokens = 4, 4, 16
    cfg.algo.filter_equal_reward_groups = False  # a random model earns no reward: keep a policy gradient
    cfg.algo.advantage = "dr_grpo"
    cfg.algo.kl_beta = 0.1  # exercise the frozen reference
    task = make_task(cfg.task, cfg.verifier.question, num_eval=4)
    fmt = ChatFormat(task.tokenizer, cfg.verifier.question)
    policy = Policy(cfg, scratch_arch(cfg, len(task.tokenizer), task.tokenizer))
    policy.freeze_reference()
    engine = make_engine("vllm", str(policy.export(f"{out_dir}/start", task.tokenizer)), cfg.rollout)
    seq = fmt.prompt_ids(task.eval[0].prompt) + task.tokenizer.encode("12+34=46", add_special_tokens=False)

    def megatron_lp():
        with torch.no_grad(), output_logits(policy.model):
            t = torch.tensor([seq])
            logits = policy.model(t, torch.arange(len(seq))[None], None)[0, :, :policy.vocab]
            return torch.log_softmax(logits, -1)[:-1].gather(-1, t[0, 1:, None])[:, 0]

    engine = CallOrder(engine)
    try:
        before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        engine_before = torch.tensor(engine.prompt_logprobs([seq])[0])
        metrics = Metrics(None)
        steps = [rl_step(s, policy, engine, task, fmt, cfg, metrics) for s in range(2)]
        moved = max((p.detach() - before[n]).abs().max().item() for n, p in policy.model.named_parameters())
        engine_after = torch.tensor(engine.prompt_logprobs([seq])[0])
        # the trainer's own scoring (what scores pools under verifier.kind=head) gives the engine's P(Yes)
        verify = [fmt.verify_ids(fmt.prompt_ids(p.prompt), task.tokenizer.encode(text, add_special_tokens=False))
                  for p in task.eval for text in ("1+2=3", "12+34=46")]
        scores = (policy.score_yes(verify, fmt.yes_id), engine.engine.score_yes(verify, fmt.yes_id))
        return {"scores": scores, "calls": engine.calls, "steps": steps, "moved": moved, "engine_change": (engine_after - engine_before).abs().max().item(),
                "engine_vs_megatron": (engine_after - megatron_lp()).abs().max().item()}
    finally:
        engine.close()


def test_two_rl_steps_change_loss_weights_and_engine(tmp_path):
    out = run_distributed(_two_steps, 1, str(tmp_path))[0]
    for s in out["steps"]:
        for key in ("loss/total", "loss/policy", "loss/verifier", "grad_norm", "policy/entropy"):
            assert math.isfinite(s[key]), key
        assert s["loss/verifier"] > 0.1  # an untrained verifier is far from certain
        assert 0.0 <= s["reward/mean"] <= 1.0 and s["sync/seconds"] > 0
    # sleep mode's order: the engine sleeps through training, is woken for the sync, then generates again
    steps = ["generate", "sleep", "wake_up", "update_weights"] * 2
    assert out["calls"] == ["prompt_logprobs", *steps, "prompt_logprobs", "close"]
    assert out["steps"][0]["policy/kl_to_reference"] == 0.0  # the first update starts at the reference
    assert out["steps"][1]["policy/kl_to_reference"] > 0.0
    assert out["moved"] > 1e-5
    assert out["engine_change"] > 1e-3  # the engine received the new weights...
    assert out["engine_vs_megatron"] < 1e-4  # ...exactly
    trainer, engine = out["scores"]
    seen = [(a, b) for a, b in zip(trainer, engine) if b > 0]  # the engine: 0 when Yes is outside its top-k
    assert seen and max(abs(a - b) for a, b in seen) < 1e-4
