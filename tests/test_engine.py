"""vLLM engine against Megatron: weight sync (logprobs match after an optimizer step), generation, seeds.

One engine start (about 25 s) serves every check here: the scenario runs once in a spawned rank.
"""

import math
import tempfile
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.slow

# fp32 engine: both sides compute the same math in the same precision; observed differences ~5e-7.
TOL = 1e-4
MAX_TOKENS = 12
LONG_PROMPT = 200  # past one CPU KV block of 128 tokens (max_model_len 256)
STOP = 2


def _megatron_logprobs(chunks, seq, vocab):
    with torch.no_grad():
        tokens = torch.tensor([seq])
        logits = chunks[0](tokens, torch.arange(len(seq))[None], None)[0, :, :vocab]
        return torch.log_softmax(logits.float(), -1)[:-1].gather(-1, tokens[0, 1:, None])[:, 0]


def _scenario(model_dir):
    from rlv_megatron.config import ModelConfig, ParallelConfig, RolloutConfig
    from rlv_megatron.dist import init_megatron
    from rlv_megatron.models.builder import build_model, padded_vocab_size
    from rlv_megatron.models.convert import iter_hf_tensors
    from rlv_megatron.models.hf_config import load_arch
    from rlv_megatron.models.hf_io import HFCheckpoint, export_hf, load_hf_weights
    from rlv_megatron.rollout.engine import VLLMEngine

    arch = load_arch(model_dir)
    par = ParallelConfig()
    init_megatron(par)
    chunks = build_model(arch, par, ModelConfig())
    load_hf_weights(chunks, model_dir, arch, padded_vocab_size(arch.vocab_size, 128, 1))
    torch.manual_seed(0)
    seq = torch.randint(3, arch.vocab_size, (40,)).tolist()
    out = {}
    # the engine starts from Megatron's own export: vLLM must load what export_hf writes
    export_dir = export_hf(chunks, arch, Path(tempfile.mkdtemp()) / "export", dtype=torch.float32)
    engine = VLLMEngine(str(export_dir), RolloutConfig(dtype="float32", max_model_len=256, weight_bucket_mb=1))
    try:
        out["engine_processes"] = _engine_processes(engine)
        out["pre_engine"] = torch.tensor(engine.prompt_logprobs([seq])[0])
        out["pre_megatron"] = _megatron_logprobs(chunks, seq, arch.vocab_size)
        # a prompt longer than a CPU KV block (128 tokens) fills the prefix cache with the old weights' KV
        long_prompt = torch.randint(3, arch.vocab_size, (LONG_PROMPT,)).tolist()
        engine.generate([long_prompt], max_tokens=MAX_TOKENS, seeds=[5])
        # one optimizer step on a next-token loss
        opt = torch.optim.AdamW(chunks[0].parameters(), lr=1e-2)
        tokens = torch.tensor([seq])
        logits = chunks[0](tokens, torch.arange(len(seq))[None], None)[0, :, :arch.vocab_size]
        torch.nn.functional.cross_entropy(logits[:-1], tokens[0, 1:]).backward()
        opt.step()
        stats = engine.update_weights(iter_hf_tensors(chunks, arch))
        out["sync"] = (stats.tensors, stats.buckets, stats.bytes)
        out["post_engine"] = torch.tensor(engine.prompt_logprobs([seq])[0])
        out["post_megatron"] = _megatron_logprobs(chunks, seq, arch.vocab_size)
        # the same long request after the sync: sampled by the new weights alone (Megatron's log-probs), and
        # the same as after an explicit prefix-cache reset
        after_sync = engine.generate([long_prompt], max_tokens=MAX_TOKENS, seeds=[5])[0][0]
        engine.llm.reset_prefix_cache()
        after_reset = engine.generate([long_prompt], max_tokens=MAX_TOKENS, seeds=[5])[0][0]
        out["long_after_sync"] = (after_sync, after_reset, _megatron_logprobs(
            chunks, long_prompt + after_sync.token_ids, arch.vocab_size)[LONG_PROMPT - 1:])
        # an incomplete sync is refused with the missing names
        partial = [(n, t) for n, t in iter_hf_tensors(chunks, arch) if "layers.3." not in n]
        try:
            engine.update_weights(partial)
            out["partial_error"] = None
        except RuntimeError as e:
            out["partial_error"] = str(e)
        engine.update_weights(iter_hf_tensors(chunks, arch))
        prompts = [seq[:5], seq[5:8], seq[8:20]]
        out["gen_a"] = engine.generate(prompts, n=4, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seeds=[1, 2, 3])
        out["gen_b"] = engine.generate(prompts, n=4, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seeds=[1, 2, 3])
        out["gen_c"] = engine.generate(prompts, n=4, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seeds=[7, 8, 9])
        out["prompts"] = prompts
        out["gen_fixed"] = engine.generate(prompts, n=4, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS,
                                           stop_token_ids=[STOP], seeds=[1, 2, 3])
        # Megatron's log-prob of each sampled token (temperature 1): must match the engine's sampling logprobs
        out["megatron_of_samples"] = [[_megatron_logprobs(chunks, p + s.token_ids, arch.vocab_size)[len(p) - 1:]
                                       for s in samples] for p, samples in zip(prompts, out["gen_a"])]
        # P("Yes") with "Yes" = the most likely next token (inside the top-k), and the least likely (outside)
        out["score_yes"], out["p_yes_megatron"], out["score_unlikely"] = [], [], []
        out["score_two_way"], out["two_way_megatron"] = [], []
        for p in prompts:
            with torch.no_grad():
                logits = chunks[0](torch.tensor([p]), torch.arange(len(p))[None], None)[0, -1, :arch.vocab_size]
            probs = torch.softmax(logits.float(), -1)
            likely, unlikely = int(probs.argmax()), int(probs.argmin())
            out["score_yes"] += engine.score_yes([p], likely)
            out["p_yes_megatron"].append(probs[likely].item())
            out["score_unlikely"] += engine.score_yes([p], unlikely)
            second = int(probs.argsort()[-2])  # renormalised over {most likely, second}: both in the top-k
            out["score_two_way"] += engine.score_yes([p], likely, second)
            out["two_way_megatron"].append((probs[likely] / (probs[likely] + probs[second])).item())
        out["partial"] = _partial_across_a_sync(engine, chunks, opt, arch, prompts)
        out["vocab"] = arch.vocab_size
        out["hf_tensors"] = len(HFCheckpoint(model_dir).weight_map)
    finally:
        engine.close()
    return out


def _partial_across_a_sync(engine, chunks, opt, arch, prompts):
    """Partial rollouts, 4 tokens a round: round 0 by the current weights (version 1), then an optimizer step
    and a sync (version 2), rounds 1 and 2 continue the same samples. Returns the samples and Megatron's
    log-probs of their tokens under both versions."""
    from rlv_megatron.models.convert import iter_hf_tensors
    from rlv_megatron.rollout.partial import PartialRollouts

    pool = PartialRollouts(4, seed=0)
    pool.admit(0, [None] * len(prompts), prompts, 0, 2)
    pool.advance(0, 0, 1, engine, MAX_TOKENS, 0, stop_token_ids=[STOP])
    v1 = [p.detach().clone() for p in chunks[0].parameters()]
    tokens = torch.tensor([prompts[0] * 3])
    logits = chunks[0](tokens, torch.arange(tokens.shape[1])[None], None)[0, :, :arch.vocab_size]
    torch.nn.functional.cross_entropy(logits[:-1], tokens[0, 1:]).backward()
    opt.step()
    engine.update_weights(iter_hf_tensors(chunks, arch))
    for rnd in (1, 2):
        pool.advance(1, rnd, 2, engine, MAX_TOKENS, 0, stop_token_ids=[STOP])
    groups = pool.take(len(prompts))  # 3 rounds of 4 = MAX_TOKENS: every sample is finished
    full = [[g.prompt + d.tokens for d in g.drafts] for g in groups]
    ref = {2: [[_megatron_logprobs(chunks, s, arch.vocab_size) for s in seqs] for seqs in full]}
    with torch.no_grad():
        for p, old in zip(chunks[0].parameters(), v1):
            p.copy_(old)
    ref[1] = [[_megatron_logprobs(chunks, s, arch.vocab_size) for s in seqs] for seqs in full]
    return [[d.sample() for d in g.drafts] for g in groups], ref


def _engine_processes(engine) -> dict:
    """The names of this process's vLLM processes, and the process and threads of each engine rank."""
    import psutil

    names = {p.pid: p.name() for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::")}
    return {"names": sorted(names.values()),
            "ranks": [(names.get(r["pid"]), r["threads"]) for r in engine.worker_processes()]}


@pytest.fixture(scope="module", params=["qwen2", "llama_tied"])
def scenario(request, tiny_models):
    return run_distributed(_scenario, 1, str(tiny_models[request.param]))[0]


def test_engine_matches_megatron_before_sync(scenario):
    assert (scenario["pre_engine"] - scenario["pre_megatron"]).abs().max().item() < TOL


def test_the_model_runs_in_the_engine_core_process_with_the_workers_threads(scenario):
    """rollout.cpu_executor=auto at one rank (rollout/cpu_executor.py): no worker process of its own, and the
    engine core gets the thread count vLLM gives a worker (one per core of rollout.cpu_threads_bind=all)."""
    import os

    assert scenario["engine_processes"] == {"names": ["VLLM::EngineCore"],
                                            "ranks": [("VLLM::EngineCore", len(os.sched_getaffinity(0)))]}


def test_weight_sync_reaches_engine(scenario):
    tensors, buckets, nbytes = scenario["sync"]
    assert tensors == scenario["hf_tensors"]  # every tensor of the HF checkpoint, no more
    assert buckets > 1 and nbytes > 2e6  # 1 MB buckets: several, so layers finish in different buckets
    assert (scenario["post_engine"] - scenario["post_megatron"]).abs().max().item() < TOL
    # the optimizer step moved the logprobs far beyond the tolerance, and the engine followed
    assert (scenario["post_engine"] - scenario["pre_engine"]).abs().max().item() > 100 * TOL


def test_no_kv_of_the_old_weights_after_a_sync(scenario):
    """The prefix cache is reset by a sync: a long prompt seen before it is recomputed by the new weights."""
    after_sync, after_reset, megatron = scenario["long_after_sync"]
    assert (torch.tensor(after_sync.logprobs) - megatron).abs().max().item() < TOL
    assert after_sync.token_ids == after_reset.token_ids and after_sync.logprobs == after_reset.logprobs


def test_incomplete_sync_is_refused(scenario):
    assert scenario["partial_error"] is not None
    assert "model.layers.3." in scenario["partial_error"]


def test_generation_well_formed(scenario):
    for prompt, samples in zip(scenario["prompts"], scenario["gen_a"]):
        assert len(samples) == 4
        for s in samples:
            assert 1 <= len(s.token_ids) <= MAX_TOKENS
            assert all(0 <= t < scenario["vocab"] for t in s.token_ids)
            assert len(s.logprobs) == len(s.token_ids)
            assert all(math.isfinite(lp) and lp <= 0 for lp in s.logprobs)
            if s.finish_reason == "stop":
                assert s.token_ids[-1] == STOP and STOP not in s.token_ids[:-1]
            else:
                assert s.finish_reason == "length" and len(s.token_ids) == MAX_TOKENS and STOP not in s.token_ids


def test_min_tokens_makes_fixed_length_rollouts(scenario):
    """algo.min_tokens = max_tokens: the stop token cannot end a sample early (equal-work benchmarks)."""
    for samples in scenario["gen_fixed"]:
        for s in samples:
            assert len(s.token_ids) == MAX_TOKENS and s.finish_reason == "length" and STOP not in s.token_ids


def test_sampling_logprobs_match_megatron(scenario):
    for samples, refs in zip(scenario["gen_a"], scenario["megatron_of_samples"]):
        for s, ref in zip(samples, refs):
            assert (torch.tensor(s.logprobs) - ref).abs().max().item() < TOL


def test_seeds_make_generation_reproducible(scenario):
    ids = lambda gen: [[s.token_ids for s in samples] for samples in gen]  # noqa: E731
    assert ids(scenario["gen_a"]) == ids(scenario["gen_b"])
    assert ids(scenario["gen_a"]) != ids(scenario["gen_c"])
    for samples in scenario["gen_a"]:  # n samples of one request differ from each other
        assert len({tuple(s.token_ids) for s in samples}) > 1


def test_score_yes_is_p_yes(scenario):
    for got, ref in zip(scenario["score_yes"], scenario["p_yes_megatron"]):
        assert got == pytest.approx(ref, rel=1e-4)
    assert scenario["score_unlikely"] == [0.0] * len(scenario["prompts"])  # outside the top-k: 0 by definition
    for got, ref, raw in zip(scenario["score_two_way"], scenario["two_way_megatron"], scenario["score_yes"]):
        assert got == pytest.approx(ref, rel=1e-4) and got > raw


def test_partial_rollouts_continue_samples_and_mark_each_tokens_weights(scenario):
    """A sample continued after a weight sync: each token's engine log-prob is the one of the weights its
    version names (what the importance-sampling correction divides by), and the sample is one whole sample."""
    samples, ref = scenario["partial"]
    spans_both, version_gap = 0, 0.0
    for i, (prompt, group) in enumerate(zip(scenario["prompts"], samples)):
        for j, s in enumerate(group):
            assert s.finish_reason in ("stop", "length") and 1 <= len(s.token_ids) <= MAX_TOKENS
            assert STOP not in s.token_ids[:-1] and (s.finish_reason == "length") == (s.token_ids[-1] != STOP)
            assert len(s.versions) == len(s.logprobs) == len(s.token_ids)
            assert s.versions == sorted(s.versions) and s.versions[:4] == [1] * min(4, len(s.token_ids))
            spans_both += len(set(s.versions)) == 2
            first = len(prompt) - 1
            for t, (lp, v) in enumerate(zip(s.logprobs, s.versions)):
                assert abs(lp - ref[v][i][j][first + t].item()) < TOL, (i, j, t, v)
                version_gap = max(version_gap, abs(lp - ref[3 - v][i][j][first + t].item()))
    assert spans_both > 0  # some sample really was continued by the newer weights
    assert version_gap > 100 * TOL  # and the two versions' log-probs differ: the check can fail
