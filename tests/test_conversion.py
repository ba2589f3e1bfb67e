"""HF <-> Megatron conversion against transformers itself, at TP=1, TP=2, PP=2 and interleaved PP."""

import pytest
import torch


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


# Each conversion of this file: (family, tp, pp, vpp). All of one world size run in one spawn, once per module.
CASES = {
    "tp1_qwen2": ("qwen2", 1, 1, None), "tp1_llama": ("llama", 1, 1, None), "tp1_qwen2_tied": ("qwen2_tied", 1, 1, None),
    "tp2_qwen2": ("qwen2", 2, 1, None), "tp2_llama": ("llama", 2, 1, None),
    "pp2_qwen2": ("qwen2", 1, 2, None), "pp2_qwen2_tied": ("qwen2_tied", 1, 2, None),
    "pp2_interleaved_llama": ("llama", 1, 2, 2),
}


def _tokens():
    torch.manual_seed(0)
    return torch.randint(0, VOCAB, (2, 24))


def _convert(tiny_models, root, world) -> dict:
    """name -> (each rank's logits, the export directory) for the cases of one world size, in one spawn."""
    from tests.distributed import run_distributed_in_turn

    names = [n for n, (_, tp, pp, _) in CASES.items() if tp * pp == world]
    calls = [(str(tiny_models[CASES[n][0]]), CASES[n][1], CASES[n][2], CASES[n][3], _tokens(), str(root / n))
             for n in names]
    return {n: (r, root / n) for n, r in zip(names, run_distributed_in_turn(_import_forward_export, world, calls))}


@pytest.fixture(scope="module")
def tp1_converted(tiny_models, tmp_path_factory) -> dict:
    return _convert(tiny_models, tmp_path_factory.mktemp("conversion"), 1)


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory) -> dict:
    return _convert(tiny_models, tmp_path_factory.mktemp("conversion"), 2)


def _check(model_dir, tmp_path, tp, pp, vpp=None):
    """One conversion in its own spawn (tests/test_real_model.py's SmolLM2), checked as this file's are."""
    from tests.distributed import run_distributed

    export_dir = tmp_path / f"export_tp{tp}_pp{pp}"
    results = run_distributed(_import_forward_export, tp * pp, str(model_dir), tp, pp, vpp, _tokens(), str(export_dir))
    _verify(model_dir, results, export_dir, tp)


def _check_case(converted, tiny_models, name):
    results, export_dir = converted[name]
    _verify(tiny_models[CASES[name][0]], results, export_dir, CASES[name][1])


def _verify(model_dir, results, export_dir, tp):
    from safetensors.torch import load_file

    tokens = _tokens()
    ref = _reference_logits(model_dir, tokens)
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
def test_tp1_matches_transformers(tp1_converted, tiny_models, family):
    _check_case(tp1_converted, tiny_models, f"tp1_{family}")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_tp2_matches_transformers(converted, tiny_models, family):
    _check_case(converted, tiny_models, f"tp2_{family}")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen2_tied"])
def test_pp2_matches_transformers(converted, tiny_models, family):
    _check_case(converted, tiny_models, f"pp2_{family}")


@pytest.mark.slow
def test_interleaved_pp2_matches_transformers(converted, tiny_models):
    _check_case(converted, tiny_models, "pp2_interleaved_llama")
