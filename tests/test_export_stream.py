"""models/hf_io.export_hf streams: at TP=2 every rank holds at most one gathered full tensor at a time (the
writer copies each to host memory as it comes, the other rank drops it), and the files it writes are the HF
model's own tensors (the tiny model transformers wrote, read back by safetensors)."""

import weakref

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.slow


def export_counting_full_tensors(model_dir, out):
    """Export at TP=2, each full tensor the gather yields replaced by a fresh copy of it (as a gather on a GPU
    makes); returns how many of those were still alive, at most, when the next one was asked for."""
    from rlv_megatron.config import Config, ParallelConfig
    from rlv_megatron.models import hf_io
    from rlv_megatron.train.policy import Policy

    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.parallel = ParallelConfig(tp=2)
    policy = Policy(cfg)
    real, alive, peak = hf_io.iter_hf_tensors, [], [0]

    def counted(*args, **kwargs):
        for name, t in real(*args, **kwargs):
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            fresh = t.clone()
            alive.append(weakref.ref(fresh))
            yield name, fresh
            del fresh

    hf_io.iter_hf_tensors = counted
    try:
        policy.export(out, dtype=torch.float32)
    finally:
        hf_io.iter_hf_tensors = real
    return peak[0], len(alive)


def test_export_holds_one_full_tensor_at_a_time_and_writes_the_hf_weights(tiny_models, tmp_path):
    from safetensors.torch import load_file

    src = tiny_models["qwen2"]
    out = tmp_path / "export"
    results = run_distributed(export_counting_full_tensors, 2, src, str(out))
    for peak, count in results:  # both TP ranks: the writer and the one that only takes part in the gather
        assert count > 10 and peak <= 1, (peak, count)
    written, reference = load_file(str(out / "model.safetensors")), load_file(str(src / "model.safetensors"))
    assert written.keys() == reference.keys()
    assert all(torch.equal(written[k], reference[k].to(written[k].dtype)) for k in reference)
