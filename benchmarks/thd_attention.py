"""Attention memory and time of a packed micro-batch on CPU: THD attention per sequence (models.varlen, what
`train.pack` runs on the local spec) against the dense block-diagonal mask over the whole row (SDPA under a
[T, T] mask, the packed path before THD) and against stored scores (megatron's DotProductAttention, what
`model.local_attention=dot_product` runs).

One attention call, forward + backward, SmolLM2-135M's shape (9 heads of 64), float32, 2 threads; sequences
of `L` tokens fill a row of T. Each case runs in a fresh process: peak RSS (ru_maxrss) minus the RSS after
the inputs exist, and the median of 3 timed calls after a warm-up.
Usage: python benchmarks/thd_attention.py   (last line: THD's peak at the largest T against the dense mask's)
"""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADS, DIM = 9, 64
CASES = [(T, L) for T in (2048, 4096, 8192) for L in (128, 512)]
KINDS = ("thd", "dense_mask", "stored_scores")


def measure(kind: str, T: int, L: int) -> dict:
    import psutil
    import torch
    import torch.nn.functional as F

    from rlv_megatron.models.varlen import block_causal_mask, sequence_ids, varlen_attention

    torch.set_num_threads(2)
    cu = torch.arange(0, T + 1, L, dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, HEADS, DIM, generator=g, requires_grad=True) for _ in range(3))
    w = torch.randn(T, HEADS * DIM, generator=g)

    def call():
        if kind == "thd":
            out = varlen_attention(q, k, v, cu, None)
        else:
            mask = block_causal_mask(sequence_ids(cu, T)[None])  # [1, 1, T, T]
            qq, kk, vv = (t.permute(1, 0, 2)[None] for t in (q, k, v))
            if kind == "dense_mask":
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=~mask)
            else:  # the scores and probabilities kept for the backward
                scores = (qq @ kk.transpose(-1, -2)) / DIM ** 0.5
                o = scores.masked_fill(mask, float("-inf")).softmax(-1) @ vv
            out = o[0].permute(1, 0, 2).reshape(T, -1)
        (out * w).sum().backward()

    base = psutil.Process().memory_info().rss
    call()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"peak": peak, "ms": sorted(times)[1] * 1e3}


def main() -> None:
    rows = {}
    print(f"{'T':>6} {'L':>5}  " + "  ".join(f"{k:>22}" for k in KINDS))
    for T, L in CASES:
        for kind in KINDS:
            out = subprocess.run([sys.executable, __file__, kind, str(T), str(L)], capture_output=True, text=True,
                                 cwd=ROOT)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            rows[T, L, kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{T:>6} {L:>5}  " + "  ".join(
            f"{rows[T, L, k]['peak'] / 2**20:8.0f} MiB {rows[T, L, k]['ms']:8.1f} ms" for k in KINDS), flush=True)
    T, L = CASES[-1]
    ours, dense = rows[T, L, "thd"], rows[T, L, "dense_mask"]
    print(f"thd_attention: {ours['peak'] / 2**20:.0f} MiB peak at {T} tokens ({T // L} x {L}), "
          f"x{ours['peak'] / dense['peak']:.3f} vs dense block mask ({ours['ms']:.0f} vs {dense['ms']:.0f} ms)")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))), flush=True)
    else:
        main()
