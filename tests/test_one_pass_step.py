"""No work that buys nothing: with one update per batch the old log-probs come from the training forward
itself (no scoring pass) with the same loss, gradients and scores; at lambda = 0 no verification turn is
built; log-probs only where a loss reads them; the equal-work options are validated."""

import pytest
import torch

from tests.distributed import run_distributed_in_turn
from tests.test_parallel_step import NO, YES, synthetic_batch


def one_pass_worker(model_dir, mode, pp):
    from rlv_megatron.config import Config, ParallelConfig
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train.step import rl_objective, score

    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.parallel = ParallelConfig(pp=pp)
    cfg.train.micro_batch_tokens = 64  # several micro-batches
    cfg.optim.lr, cfg.optim.eps = 1e-3, 1e-6
    policy = Policy(cfg)
    batch = synthetic_batch()
    out = []
    for _ in range(2):
        outputs = {}
        if mode == "recompute":
            old, p_yes = score(policy.chunks, batch, policy.vocab, 1.0, YES, None, cfg.train, policy.groups)
            stats = policy.train_step(batch, rl_objective(batch, old, cfg.algo, cfg.verifier, policy.vocab, YES, NO))
        else:
            stats = policy.train_step(batch, rl_objective(batch, None, cfg.algo, cfg.verifier, policy.vocab, YES, NO),
                                      outputs=outputs)
            old, p_yes = outputs["logp"], outputs["score"][torch.arange(len(batch)), batch.verify_pos]
        out.append({**stats, "old": old * batch.response_mask, "p_yes": p_yes})
    out.append({"weights": torch.cat([p.detach().flatten() for p in policy.model.parameters()])})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("pp", [1, 2])
def test_old_logprobs_from_the_training_forward_change_nothing(qwen, pp):
    ref, got = (r[-1] for r in run_distributed_in_turn(one_pass_worker, pp, [(qwen, "recompute", pp),
                                                                          (qwen, "current", pp)]))
    for a, b in zip(ref[:2], got[:2]):
        for k in ("loss/total", "loss/policy", "loss/verifier", "grad_norm", "policy/ratio_mean", "policy/entropy"):
            assert b[k] == pytest.approx(a[k], abs=1e-6, rel=1e-6), k
        assert a["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # one update: the ratio is 1
        assert (a["old"] - b["old"]).abs().max() < 1e-5
        assert (a["p_yes"] - b["p_yes"]).abs().max() < 1e-6 and a["p_yes"].min() > 0
    assert (ref[2]["weights"] - got[2]["weights"]).abs().max() < 1e-6  # the same updates, twice
    assert ref[0]["loss/total"] != pytest.approx(ref[1]["loss/total"], abs=1e-4)  # and they moved the model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from rlv_megatron.models.tiny import make_hf_model

    return make_hf_model("qwen2", tmp_path_factory.mktemp("qwen") / "m", seed=3)


class _Tok:
    """A character tokenizer with a chat-free raw mode: enough for build_sequences."""
    eos_token_id, pad_token_id = 2, 0

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + ord(c) % 90 for c in text]

    def apply_chat_template(self, *a, **k):
        raise AssertionError("raw prompts use no chat template")


def test_lambda_zero_builds_no_verification_turn():
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.train.step import token_fields
    from rlv_megatron.train.batch import build_sequences

    fmt = ChatFormat(_Tok(), "Right?", yes="Y", no="N", raw=True)
    prompt = fmt.prompt_ids("1+1")
    assert prompt == [1] + _Tok().encode("1+1", add_special_tokens=False)  # BOS, then the text as it is
    responses = [[40, 41, 2], [42, 43, 44, 45]]  # one stopped, one truncated
    with_turn = build_sequences(fmt, [prompt] * 2, responses, [1.0, 0.0], [0.5, -0.5], [True, True], 0,
                                rollout_logps=[[-1.0] * 3, [-1.0] * 4])
    bare = build_sequences(fmt, [prompt] * 2, responses, [1.0, 0.0], [0.5, -0.5], [True, True], 0,
                           rollout_logps=[[-1.0] * 3, [-1.0] * 4], verify_turn=False)
    assert bare.verify_pos.tolist() == [len(prompt) + 3 - 2, len(prompt) + 4 - 2]  # the last target
    assert (with_turn.verify_pos - bare.verify_pos).tolist() == [len(fmt.verify_suffix_ids) + 1,
                                                                 len(fmt.verify_suffix_ids) + 2]  # + eos
    assert torch.equal(bare.response_mask, with_turn.response_mask[:, :bare.response_mask.shape[1]])
    assert bare.verify_weight.sum() == 0 and not bare.has_verify.any() and with_turn.has_verify.all()
    assert token_fields(bare)["answer"].sum() == 0 and token_fields(with_turn)["answer"].sum() == 2
    assert bare.targets[1, bare.verify_pos[1]].item() == 45  # no eos appended without a verification turn
    assert bare.select(torch.tensor([1])).verify_turn.tolist() == [False]


def test_logprobs_only_where_asked_equal_the_full_ones():
    from rlv_megatron.train.heads import FusedHead, FusedSpec, LogitsHead

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    where = torch.rand(3, 7, generator=g) > 0.4
    for make in (lambda h: FusedHead(h, weight, 50, FusedSpec(1.0, False)),
                 lambda h: LogitsHead(h @ weight.T, 50)):
        full, ent_full = make(hidden).token_logprobs(targets, 0.7, with_entropy=True)
        part, ent_part = make(hidden).token_logprobs(targets, 0.7, with_entropy=True, where=where)
        assert torch.allclose(part[where], full[where], atol=1e-6) and (part[~where] == 0).all()
        assert torch.allclose(ent_part[where], ent_full[where], atol=1e-6) and (ent_part[~where] == 0).all()
        g_full, = torch.autograd.grad((full * where).sum(), hidden)
        g_part, = torch.autograd.grad(part.sum(), hidden)
        assert torch.allclose(g_full, g_part, atol=1e-6)


def test_equal_work_options_are_validated():
    from rlv_megatron.config import Config, ConfigError, cpu_threads_bind, validate

    def bad(**fields):
        cfg = Config()
        for dotted, v in fields.items():
            section, name = dotted.split("__")
            setattr(getattr(cfg, section), name, v)
        with pytest.raises(ConfigError) as e:
            validate(cfg)
        return str(e.value)

    assert "algo.min_tokens" in bad(algo__min_tokens=33)  # above max_tokens (32)
    assert "algo.old_logprobs=current" in bad(algo__old_logprobs="current", algo__ppo_epochs=2)
    assert "train.cpu_threads" in bad(train__cpu_threads=-1)
    assert "rollout.cpu_threads_bind" in bad(rollout__cpu_threads_bind="cores 0 and 1")
    cfg = Config()
    cfg.rollout.tensor_parallel_size, cfg.rollout.cpu_threads_bind = 2, "0-1"
    with pytest.raises(ConfigError, match="one per rank"):
        cpu_threads_bind(cfg.rollout)
    cfg.rollout.cpu_threads_bind = "0|1"
    assert cpu_threads_bind(cfg.rollout) == "0|1"
    cfg.rollout.cpu_threads_bind = "auto"
    assert cpu_threads_bind(cfg.rollout) is None
    cfg.rollout.cpu_threads_bind, cfg.rollout.tensor_parallel_size = "all", 1
    import os

    assert cpu_threads_bind(cfg.rollout) == ",".join(map(str, sorted(os.sched_getaffinity(0))))
    # a cluster config validates anywhere; only a CPU engine start asks this machine for its cores
    cfg.rollout.tensor_parallel_size = len(os.sched_getaffinity(0)) + 1
    validate(cfg)
    with pytest.raises(ConfigError, match="more engine ranks than"):
        cpu_threads_bind(cfg.rollout)


def test_old_logprobs_auto_follows_the_number_of_updates():
    from rlv_megatron.config import AlgoConfig
    from rlv_megatron.train.loop import old_logprobs_from_forward

    assert old_logprobs_from_forward(AlgoConfig())
    assert not old_logprobs_from_forward(AlgoConfig(ppo_minibatches=2))
    assert not old_logprobs_from_forward(AlgoConfig(old_logprobs="recompute"))
