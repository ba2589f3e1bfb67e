"""Measured peak memory of one RL^V train step on CPU against `rlv plan`'s estimate (same config).

Each config runs in a fresh process: peak RSS (ru_maxrss) minus the RSS before the model is built.
Usage: python benchmarks/plan_memory.py   (last line: the worst estimate/measured ratio)
"""

import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (hidden, layers, heads, kv heads, ffn, vocab, micro-batch tokens, sequence length, recompute). The first three set
# the planner's backward-workspace term (two layers' gradients); the others were not looked at while fitting.
CONFIGS = [
    (512, 8, 8, 4, 1536, 32000, 2048, 256, "none"),
    (512, 8, 8, 4, 1536, 32000, 2048, 256, "full"),
    (768, 6, 12, 4, 2048, 50000, 4096, 128, "none"),
    (384, 12, 6, 2, 1024, 20000, 3072, 96, "selective"),
    (1024, 4, 16, 8, 2816, 64000, 1024, 512, "none"),
]


def measure(c) -> dict:
    """In this process: build the policy for config `c`, run one train step, return memory figures."""
    import psutil
    import torch

    from rlv_megatron.config import Config
    from rlv_megatron.dist import init_process_group
    from rlv_megatron.models.hf_config import ModelArch
    from rlv_megatron.plan import DEVICES, estimate

    h, L, a, kv, f, V, T, row, rec = c
    init_process_group()
    arch = ModelArch(family="qwen2", vocab_size=V, hidden_size=h, ffn_hidden_size=f, num_layers=L, num_heads=a,
                     num_kv_heads=kv, head_dim=h // a, norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=4096, qkv_bias=True, tie_word_embeddings=False)
    cfg = Config()
    cfg.train.micro_batch_tokens, cfg.parallel.recompute = T, rec
    # one sequence of `row` tokens per row: the [row, row] scores per row the formulas were fitted on (then
    # with 8 packed sequences of 32 per row under a block mask); the engine's context bounds the sequence
    cfg.train.pack, cfg.rollout.max_model_len, cfg.train.share_prompts = False, row, False
    # the attention the formulas were fitted on (stored scores); SDPA (the default) peaks lower, and the
    # estimate then errs high (BENCHMARKS.md)
    cfg.model.local_attention = "dot_product"
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train.step import sft_objective
    from rlv_megatron.train.batch import SequenceBatch

    torch.set_num_threads(2)
    base = psutil.Process().memory_info().rss
    policy = Policy(cfg, arch)
    n = T // row  # sequences of `row` tokens fill the micro-batch exactly
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, V, (n, row), generator=g)
    mask = torch.zeros(n, row, dtype=torch.bool)
    mask[:, 8:row - 2] = True
    batch = SequenceBatch(toks, toks.roll(-1, 1), mask, mask, torch.full((n,), row - 1), torch.full((n,), 5),
                          torch.ones(n), torch.zeros(n), torch.zeros(n, row))
    policy.train_step(batch, sft_objective(batch, V, 5, 7, "full"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plan = estimate(cfg, arch, DEVICES["cpu"], world_size=1)
    return {"measured": peak - base, "estimated": plan.total, "terms": plan.memory}


def main() -> None:
    worst = 0.0
    for c in CONFIGS:
        out = subprocess.run([sys.executable, __file__, json.dumps(c)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = r["estimated"] / r["measured"]
        worst = max(worst, abs(ratio - 1))
        terms = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r["terms"].items())
        print(f"{c}: measured {r['measured'] / 2**20:.0f} MiB, estimated {r['estimated'] / 2**20:.0f} MiB "
              f"(x{ratio:.2f}; {terms})", flush=True)
    print(f"plan_memory: worst estimate off by {worst * 100:.1f}%, x{1 + worst:.2f} vs measured peak")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
        from rlv_megatron.dist import destroy

        destroy()
    else:
        main()
