"""The foundation end to end on CPU, in about a minute: what exists before the RL^V loop lands.

1. transformers writes a small random Qwen2; it is imported into a megatron-core GPTModel and the logits
   are checked against transformers.
2. A colocated vLLM engine starts on the same weights and samples (seeded).
3. Megatron trains a few AdamW steps to make the model continue a fixed token pattern; the weights are
   synced to vLLM in buckets, and the engine's greedy continuation and log-probs are compared with
   Megatron's: the engine now produces the pattern.
4. The trained model is exported as a Hugging Face directory.
Simplifications: one process (TP=PP=1), a token-level toy objective instead of RL, no tokenizer.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import torch

PATTERN = [11, 22, 33, 44, 55, 66, 77, 88]


def _next_token_loss(chunk, seq: torch.Tensor, vocab: int) -> torch.Tensor:
    logits = chunk(seq, torch.arange(seq.shape[1])[None].expand_as(seq), None)[..., :vocab]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), seq[:, 1:].reshape(-1))


def run(out_dir: str | Path = "runs/demo", steps: int = 40, seed: int = 0) -> Path:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # a demo's output is its own report
    warnings.filterwarnings("ignore", category=UserWarning)
    import transformers

    from rlv_megatron.config import ModelConfig, ParallelConfig, RolloutConfig
    from rlv_megatron.dist import free_port, init_megatron
    from rlv_megatron.models.builder import build_model, padded_vocab_size
    from rlv_megatron.models.convert import iter_hf_tensors
    from rlv_megatron.models.hf_config import load_arch
    from rlv_megatron.models.hf_io import export_hf, load_hf_weights
    from rlv_megatron.models.tiny import make_hf_model
    from rlv_megatron.rollout.engine import VLLMEngine

    t_start = time.time()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)
    report: dict = {}

    print("[1/4] random Qwen2 from transformers -> megatron-core GPTModel")
    hf_dir = make_hf_model("qwen2", out / "initial_hf", seed=seed, num_hidden_layers=4, hidden_size=256,
                           intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)
    arch = load_arch(hf_dir)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_megatron(ParallelConfig(), seed=seed)
    chunk = build_model(arch, ParallelConfig(), ModelConfig())[0]
    load_hf_weights([chunk], hf_dir, arch, padded_vocab_size(arch.vocab_size, 128, 1))
    probe = torch.randint(3, arch.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = chunk(probe, torch.arange(32)[None].expand(2, 32), None)[..., :arch.vocab_size]
        ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(probe).logits
    report["megatron_vs_transformers_max_abs_logit_diff"] = (ours - ref).abs().max().item()
    n_params = sum(p.numel() for p in chunk.parameters())
    print(f"      {n_params / 1e6:.1f}M parameters; max |logit diff| vs transformers "
          f"{report['megatron_vs_transformers_max_abs_logit_diff']:.2e}")

    print("[2/4] colocated vLLM engine (fp32 weights), seeded sampling")
    engine = VLLMEngine(str(hf_dir), RolloutConfig(dtype="float32", max_model_len=256, weight_bucket_mb=2))
    try:
        prompt = PATTERN[:3]
        t0 = time.perf_counter()
        samples = engine.generate([prompt] * 4, n=4, max_tokens=64, seeds=[1, 2, 3, 4])
        dt = time.perf_counter() - t0
        n_tok = sum(len(s.token_ids) for group in samples for s in group)
        report["rollout_tokens_per_s"] = n_tok / dt
        print(f"      {n_tok} tokens in {dt:.2f}s ({n_tok / dt:.0f} tokens/s); sample: {samples[0][0].token_ids[:8]}")

        print(f"[3/4] {steps} AdamW steps in Megatron on the pattern {PATTERN}, then weight sync to vLLM")
        target = torch.tensor([PATTERN * 4])
        opt = torch.optim.AdamW(chunk.parameters(), lr=3e-3)
        for step in range(steps):
            loss = _next_token_loss(chunk, target, arch.vocab_size)
            opt.zero_grad()
            loss.backward()
            opt.step()
        report["final_train_loss"] = loss.item()
        before = engine.generate([prompt], n=1, temperature=0.0, max_tokens=8)[0][0].token_ids
        stats = engine.update_weights(iter_hf_tensors([chunk], arch))
        after = engine.generate([prompt], n=1, temperature=0.0, max_tokens=8)[0][0].token_ids
        seq = (PATTERN * 2)[:12]
        engine_lp = torch.tensor(engine.prompt_logprobs([seq])[0])
        with torch.no_grad():
            logits = chunk(torch.tensor([seq]), torch.arange(len(seq))[None], None)[0, :, :arch.vocab_size]
            megatron_lp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        expected = (PATTERN * 2)[3:11]
        report.update(sync_seconds=stats.seconds, sync_gb_per_s=stats.gbps, sync_buckets=stats.buckets,
                      greedy_before_sync=before, greedy_after_sync=after, greedy_expected=expected,
                      engine_vs_megatron_max_abs_logprob_diff=(engine_lp - megatron_lp).abs().max().item())
        print(f"      loss {loss.item():.3f}; sync {stats.bytes / 1e6:.1f} MB in {stats.buckets} buckets, "
              f"{stats.seconds:.2f}s")
        print(f"      vLLM greedy before sync {before}\n      vLLM greedy after sync  {after}  (expected {expected})")
        print(f"      max |logprob diff| vLLM vs Megatron after sync "
              f"{report['engine_vs_megatron_max_abs_logprob_diff']:.2e}")
    finally:
        engine.close()

    print("[4/4] export the trained model as a Hugging Face directory")
    export_dir = export_hf([chunk], arch, out / "trained_hf", dtype=torch.bfloat16)
    report.update(export_dir=str(export_dir), seconds=time.time() - t_start,
                  engine_learned_pattern=after == expected)
    path = out / "demo_metrics.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"done in {report['seconds']:.0f}s; engine learned the pattern: {report['engine_learned_pattern']}")
    print(path)
    return path
