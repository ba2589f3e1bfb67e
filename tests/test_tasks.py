"""The synthetic task and the verification layout (exact tokens and label position)."""

import itertools
import random
import re

import pytest
import torch

from rlv_megatron.tasks import subset_sum as ss
from rlv_megatron.tasks.chat import ChatFormat
from rlv_megatron.train.batch import build_sequences, verifier_selection


@pytest.mark.parametrize("cfg", [ss.SubsetSumConfig(), ss.SubsetSumConfig(n_numbers=4, min_number=10, max_number=99, min_target=100)])
def test_problems_have_a_unique_answer_and_a_valid_trace(cfg):
    for p in ss.problems(200, seed=1, cfg=cfg):
        sums = [sum(c) for r in range(1, 6) for c in itertools.combinations(p.numbers, r)]
        assert sums.count(p.target) == 1 and p.target >= cfg.min_target
        assert len(p.numbers) == cfg.n_numbers and all(cfg.min_number <= n <= cfg.max_number for n in p.numbers)
        t = ss.trace(p.subset)
        assert ss.extract_answer(t) == p.answer and ss.grade(t, p.answer) == 1.0
        assert t.split(";")[-1].endswith(f"={p.target}")


@pytest.mark.parametrize("cfg", [ss.SubsetSumConfig(), ss.SubsetSumConfig(n_numbers=4, min_number=10, max_number=99, min_target=100)])
def test_corrupted_traces_are_wrong_and_of_every_kind(cfg):
    rng = random.Random(0)
    kinds = set()
    for p in ss.problems(100, seed=2, cfg=cfg):
        for _ in range(5):
            bad = ss.corrupted_trace(p, rng, cfg)
            assert ss.grade(bad, p.answer) == 0.0, (p.prompt, bad)
            steps = [tuple(map(int, re.split(r"[+=]", s))) for s in bad.split(";")]
            chosen = [steps[0][0]] + [b for _, b, _ in steps]
            arithmetic_ok = all(a + b == c for a, b, c in steps)
            ends_at_target = steps[-1][2] == p.target
            if any(x not in p.numbers for x in chosen):
                kinds.add("invented")
                assert all(cfg.min_number <= x <= cfg.max_number for x in chosen)
                assert arithmetic_ok and ends_at_target
            elif len(set(chosen)) < len(chosen):
                kinds.add("repeated")
                assert arithmetic_ok and ends_at_target
            elif arithmetic_ok:
                kinds.add("wrong_subset")
                assert not ends_at_target
            else:
                kinds.add("forced_target")
                assert ends_at_target and all(a + b == c for a, b, c in steps[:-1])
    assert kinds == {"invented", "repeated", "wrong_subset", "forced_target"}


def test_held_out_problems_stay_out_of_training_in_any_order():
    from rlv_megatron.config import ConfigError, TaskConfig
    from rlv_megatron.tasks.registry import make_task

    task = make_task(TaskConfig(), "q", num_eval=500)
    held = {(frozenset(p.numbers), p.target) for p in task.eval}
    assert len(held) == 500  # distinct problems, not distinct orderings of a few
    # the whole reserve stays out, so a run evaluating on more problems never meets trained-on ones
    reserve = {(frozenset(p.numbers), p.target) for p in make_task(TaskConfig(), "q", num_eval=1000).eval}
    assert held < reserve
    for seed in range(5):
        train = task.sample_train(2000, seed)
        assert not {(frozenset(p.numbers), p.target) for p in train} & reserve
    with pytest.raises(ConfigError, match="eval.num_problems=1001"):
        make_task(TaskConfig(), "q", num_eval=1001)


def test_malformed_solutions_have_no_answer():
    for bad in ["", "12+", "12+30=42;43+5=48", "12+30=42;42+x=1", "#"]:
        assert ss.extract_answer(bad) is None


def test_verification_layout_exact_tokens_and_label_position():
    tok = ss.make_tokenizer()
    fmt = ChatFormat(tok)
    prompt = fmt.prompt_ids("12,34:46")
    assert tok.convert_ids_to_tokens(prompt) == ["<bos>", "<|user|>", *"12,34:46", "<|assistant|>"]
    response = tok.encode("12+34=46", add_special_tokens=False) + [fmt.eos_id]
    truncated = tok.encode("12+3", add_special_tokens=False)
    batch = build_sequences(fmt, [prompt, prompt], [response, truncated], rewards=[1.0, 0.0], advantages=[0.5, -0.5],
                            verify=[True, False], pad_id=tok.pad_token_id, rollout_logps=[[-0.1] * 9, [-0.2] * 4])
    full = prompt + response + fmt.verify_suffix_ids + [fmt.yes_id]
    assert tok.convert_ids_to_tokens(fmt.verify_suffix_ids) == ["<|user|>", fmt.question, "<|assistant|>"]
    assert batch.tokens[0, :len(full) - 1].tolist() == full[:-1]
    assert batch.targets[0, :len(full) - 1].tolist() == full[1:]
    assert batch.verify_pos[0].item() == len(full) - 2 and batch.targets[0, batch.verify_pos[0]].item() == fmt.yes_id
    # the policy targets are exactly the response tokens (EOS included)
    assert batch.targets[0][batch.policy_mask[0]].tolist() == response
    # a truncated response gets an EOS before the verification turn, which is not a policy target
    assert batch.targets[1][batch.policy_mask[1]].tolist() == truncated
    assert torch.equal(batch.response_mask, batch.policy_mask)
    assert batch.targets[1, batch.verify_pos[1]].item() == fmt.no_id
    assert batch.verify_weight.tolist() == [1.0, 0.0]
    assert torch.equal(batch.rollout_logp[0][batch.policy_mask[0]], torch.full((9,), -0.1))


def test_balanced_verifier_examples():
    rewards = [1.0] * 3 + [0.0] * 7
    keep = verifier_selection(rewards, "balanced", random.Random(0))
    assert sum(k for k, r in zip(keep, rewards) if r) == 3 and sum(k for k, r in zip(keep, rewards) if not r) == 3
    assert verifier_selection(rewards, "all", random.Random(0)) == [True] * 10


def test_math_and_gsm8k_tasks_read_cached_datasets_and_grade(tmp_path):
    from rlv_megatron.config import TaskConfig
    from rlv_megatron.tasks.registry import make_task

    ss.make_tokenizer().save_pretrained(tmp_path)  # any HF tokenizer directory serves for grading
    math_task = make_task(TaskConfig(name="math", train_path="math/train",
                                     eval_path="math500/test"), "q", num_eval=8,
                          tokenizer_path=str(tmp_path))
    gsm_task = make_task(TaskConfig(name="gsm8k", train_path="gsm8k/train",
                                    eval_path="gsm8k/test"), "q", num_eval=8,
                         tokenizer_path=str(tmp_path))
    try:
        for task, fmt_answer in ((math_task, "so the answer is $\\boxed{%s}$."), (gsm_task, "... #### %s")):
            assert len(task.eval) == 8 and len(task.sample_train(5, seed=0)) == 5
            right = [fmt_answer % p.answer for p in task.eval]
            wrong = [fmt_answer % "987654321" for p in task.eval]  # no MATH-500/GSM8K answer here is that
            scores, stats = task.grade(right + wrong, [p.answer for p in task.eval] * 2)
            assert scores == [1.0] * 8 + [0.0] * 8 and stats["timeouts"] == 0
            assert task.answer_key(right[0]) is not None
    finally:
        math_task.close()
        gsm_task.close()


def test_dataset_task_needs_its_paths():
    import pytest

    from rlv_megatron.config import ConfigError, TaskConfig
    from rlv_megatron.tasks.registry import make_task

    with pytest.raises(ConfigError, match="task.train_path"):
        make_task(TaskConfig(name="math"), "q", num_eval=1, tokenizer_path="x")
