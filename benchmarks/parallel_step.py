"""RL^V train step time at TP=1 (one process, 2 threads) vs TP=2 and DP=2 (two gloo processes, 1 thread
each) on this machine: the same global batch, score + train step, median of timed steps.
Usage: python benchmarks/parallel_step.py [--steps 5]   (last line: the ratios)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
YES, NO = 5, 7


def worker(tp: int, steps: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from megatron.core import parallel_state as ps

    from rlv_megatron.config import Config
    from rlv_megatron.models.hf_config import ModelArch
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train.step import rl_objective, score
    from rlv_megatron.train.batch import SequenceBatch

    arch = ModelArch(family="qwen2", vocab_size=32000, hidden_size=512, ffn_hidden_size=1536, num_layers=8,
                     num_heads=8, num_kv_heads=4, head_dim=64, norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=1024, qkv_bias=True, tie_word_embeddings=False)
    cfg = Config()
    cfg.parallel.tp = tp
    cfg.train.micro_batch_tokens = 4096
    policy = Policy(cfg, arch)
    n, L = 64, 96  # the global batch: 64 rollouts of 96 tokens
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, arch.vocab_size, (n, L), generator=g)
    mask = torch.zeros(n, L, dtype=torch.bool)
    mask[:, 16:L - 4] = True
    full = SequenceBatch(toks, toks.roll(-1, 1), mask, mask, torch.full((n,), L - 1), torch.full((n,), YES),
                         torch.ones(n), torch.randn(n, generator=g), -torch.rand(n, L, generator=g) * mask)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batch = full.select(torch.arange(n).chunk(dp)[r])
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        old, _ = score(policy.chunks, batch, policy.vocab, 1.0, YES, NO, cfg.train, policy.groups)
        policy.train_step(batch, rl_objective(batch, old, cfg.algo, cfg.verifier, policy.vocab, YES, NO,
                                              dp_group=policy.groups.dp))
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    if torch.distributed.get_rank() == 0:
        print(json.dumps({"median_s": statistics.median(times)}), flush=True)
    from rlv_megatron.dist import destroy

    destroy()


def run(nproc: int, tp: int, threads: int, steps: int) -> float:
    from rlv_megatron.dist import free_port

    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"] if nproc > 1 else [sys.executable]
    out = subprocess.run([*launcher, __file__, "--worker", str(tp), "--steps", str(steps)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])["median_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.steps)
    sys.path.insert(0, str(ROOT))
    base = run(1, 1, 2, args.steps)
    tp2 = run(2, 2, 1, args.steps)
    dp2 = run(2, 1, 1, args.steps)
    print(f"TP=1 (1 process x 2 threads): {base:.2f} s/step")
    print(f"TP=2 (2 processes x 1 thread): {tp2:.2f} s/step, x{base / tp2:.2f}")
    print(f"DP=2 (2 processes x 1 thread): {dp2:.2f} s/step, x{base / dp2:.2f}")
    print(f"parallel_step: TP=2 {tp2:.2f} s/step, x{base / tp2:.2f} vs TP=1; DP=2 {dp2:.2f} s/step, "
          f"x{base / dp2:.2f} vs TP=1")


if __name__ == "__main__":
    main()
