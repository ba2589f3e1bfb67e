"""Peak memory and time of the fused chunked log-prob (kernels/verifier_loss.py, the trainer's default loss
path; its PyTorch path on CPU) against naive full-logits cross-entropy, at Qwen2.5-1.5B's output shapes:
T = 4096 tokens, H = 1536, V = 151936, fp32, forward + backward (gradients of hidden states and weight).

Each path runs in its own process. Memory is the peak resident set above what the process held once its
inputs existed, reported two ways: "working" memory (peak minus the two gradients the backward must return,
[T, H] and [V, H], which both paths produce alike: the memory the loss itself needs) and "total" (with them).
Both paths' log-probs and gradients are compared within 1e-5 (all of d hidden; 2048 sampled rows of d weight).
Usage: python benchmarks/fused_logprob.py [--tokens 4096] [--chunk-mb 256]
Last line: `fused_logprob: peak W GB vs N GB, xR less memory` (working memory).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H, V = 1536, 151936


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(path: str, tokens: int, chunk_mb: float, out: str) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from kernels.verifier_loss import chunk_rows, fused_logprobs, naive_logprobs

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, H, generator=g).requires_grad_()  # post-norm scale
    weight = (0.02 * torch.randn(V, H, generator=g)).requires_grad_()  # initialiser scale
    targets = torch.randint(0, V, (tokens,), generator=g)
    base = rss_bytes()
    t0 = time.perf_counter()
    if path == "fused":
        lp, _ = fused_logprobs(hidden, weight, targets, V, chunk=chunk_rows(V, chunk_mb), use_triton=False)
    else:
        lp, _ = naive_logprobs(hidden, weight, targets, V)
    d_hidden, d_weight = torch.autograd.grad(-lp.sum(), [hidden, weight])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    rows = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:2048]
    torch.save({"lp": lp.detach(), "d_hidden": d_hidden, "d_weight_rows": d_weight[rows]}, out)
    grads = (d_hidden.numel() + d_weight.numel()) * 4
    print(json.dumps({"seconds": seconds, "peak": peak, "working": peak - grads}))


def run(path: str, args, out: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", path, "--tokens", str(args.tokens),
                           "--chunk-mb", str(args.chunk_mb), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import tempfile

    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk-mb", type=float, default=256.0)
    p.add_argument("--worker")
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.tokens, args.chunk_mb, args.out)
    gb = 1e9
    with tempfile.TemporaryDirectory() as d:
        res = {k: run(k, args, Path(d, f"{k}.pt")) for k in ("naive", "fused")}
        a, b = torch.load(Path(d, "fused.pt")), torch.load(Path(d, "naive.pt"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    same = all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-5) for k in a)
    print(f"T={args.tokens} H={H} V={V} fp32, chunk {args.chunk_mb:g} MiB of logits")
    for k, r in res.items():
        print(f"  {k:5s}: {r['seconds']:6.1f} s forward+backward, peak {r['peak'] / gb:5.2f} GB total, "
              f"{r['working'] / gb:5.2f} GB working (beyond inputs and returned gradients)")
    print(f"  total peak x{res['naive']['peak'] / res['fused']['peak']:.1f} less; time "
          f"x{res['naive']['seconds'] / res['fused']['seconds']:.2f} of naive's speed; "
          f"largest difference {worst:.2e} ({'within' if same else 'NOT within'} 1e-5)")
    if not same:
        raise SystemExit("fused and naive results differ by more than 1e-5")
    w_f, w_n = res["fused"]["working"], res["naive"]["working"]
    print(f"fused_logprob: peak {w_f / gb:.2f} GB vs {w_n / gb:.2f} GB, x{w_n / w_f:.1f} less memory")


if __name__ == "__main__":
    main()
