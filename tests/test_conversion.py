"""HF <-> Megatron conversion against transformers itself, at TP=1, TP=2, PP=2 and interleaved PP."""

import pytest
import torch

from tests.distributed import run_distributed

VOCAB = 1000


def _reference_logits(model_dir, tokens):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


def _import_forward_export(model_dir, tp, pp, vpp, tokens, export_dir):
    from rlv_megatron.config import ModelConfig, ParallelConfig
    from rlv_megatron.dist import init_megatron
    from rlv_megatron.models.builder import build_model, padded_vocab_size
    from rlv_megatron.models.hf_config import load_arch
    from rlv_megatron.models.hf_io import export_hf, load_hf_weights
    from rlv_megatron.train.packing import MicroBatch
    from rlv_megatron.train.step import run_schedule

    torch.set_num_threads(1)
    arch = load_arch(model_dir)
    par = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    init_megatron(par)
    chunks = build_model(arch, par, ModelConfig())
    for c in chunks:  # destroy the random init so a missed tensor cannot pass by luck
        for p in c.parameters():
            torch.nn.init.normal_(p, std=3.0)
    load_hf_weights(chunks, model_dir, arch, padded_vocab_size(arch.vocab_size, 128, tp))
    from megatron.core import tensor_parallel

    S = tokens.shape[1]
    mbs = [MicroBatch(tokens[i:i + 1], None, torch.full((1, S), i), torch.arange(S)[None])
           for i in range(tokens.shape[0])]
    # the trainer's own schedule; full logits gathered over TP (build_model's head returns logits)
    out = run_schedule(chunks, mbs, lambda head, mb: tensor_parallel.gather_from_tensor_model_parallel_region(
        head.logits), forward_only=True, vocab=arch.vocab_size)
    export_hf(chunks, arch, export_dir, dtype=torch.float32)
    return None if out is None else torch.cat(out)[..., :arch.vocab_size]


def _check(model_dir, tmp_path, tp, pp, vpp=None):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 24))
    ref = _reference_logits(model_dir, tokens)
    export_dir = tmp_path / f"export_tp{tp}_pp{pp}"
    world = tp * pp
    if world == 1:
        from tests.distributed import run_distributed as _  # noqa: F401  (same code path below)
    results = run_distributed(_import_forward_export, world, str(model_dir), tp, pp, vpp, tokens, str(export_dir))
    last = [r for r in results if r is not None]
    assert len(last) == tp  # every TP rank of the last stage returns the gathered logits
    for logits in last:
        assert logits.shape == ref.shape
        assert (logits - ref).abs().max().item() < 1e-4
    # export -> transformers gives the same logits, and the tensors round-trip exactly
    assert (_reference_logits(export_dir, tokens) - ref).abs().max().item() < 1e-5
    exported = {}
    for f in export_dir.glob("*.safetensors"):
        exported.update(load_file(f))
    original = load_file(model_dir / "model.safetensors")
    assert set(exported) == set(original)
    for name, t in original.items():
        assert torch.equal(exported[name], t), name


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen2_tied"])
def test_tp1_matches_transformers(tiny_models, tmp_path, family):
    _check(tiny_models[family], tmp_path, tp=1, pp=1)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_tp2_matches_transformers(tiny_models, tmp_path, family):
    _check(tiny_models[family], tmp_path, tp=2, pp=1)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen2_tied"])
def test_pp2_matches_transformers(tiny_models, tmp_path, family):
    _check(tiny_models[family], tmp_path, tp=1, pp=2)


@pytest.mark.slow
def test_interleaved_pp2_matches_transformers(tiny_models, tmp_path):
    _check(tiny_models["llama"], tmp_path, tp=1, pp=2, vpp=2)
