"""Conversion building blocks against hand-built layouts (no distributed setup needed)."""

import pytest
import torch

from rlv_megatron.models import convert
from rlv_megatron.models.hf_config import ModelArch


def _arch(heads=4, kv=2, head_dim=2, hidden=8, vocab=10, tied=False):
    return ModelArch(family="qwen2", vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=6, num_layers=2,
                     num_heads=heads, num_kv_heads=kv, head_dim=head_dim, norm_eps=1e-6, rope_theta=1e4,
                     max_position_embeddings=64, qkv_bias=True, tie_word_embeddings=tied)


def test_fused_qkv_layout_is_grouped_by_kv_head():
    arch = _arch(heads=4, kv=2, head_dim=1, hidden=1)
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])  # heads 0,1 -> group 0; heads 2,3 -> group 1
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = convert.fuse_qkv(q, k, v, arch)
    assert fused[:, 0].tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert all(torch.equal(a, b) for a, b in zip(convert.split_qkv(fused, arch), (q, k, v)))


def test_fused_qkv_bias_roundtrip():
    arch = _arch()
    q, k, v = torch.randn(8), torch.randn(4), torch.randn(4)
    assert all(torch.equal(a, b) for a, b in zip(convert.split_qkv(convert.fuse_qkv(q, k, v, arch), arch), (q, k, v)))


@pytest.mark.parametrize("name,shape", [
    ("decoder.layers.0.self_attention.linear_qkv.weight", (16, 8)),
    ("decoder.layers.0.self_attention.linear_qkv.bias", (16,)),
    ("decoder.layers.0.self_attention.linear_proj.weight", (8, 8)),
    ("decoder.layers.0.mlp.linear_fc1.weight", (12, 8)),
    ("decoder.layers.0.mlp.linear_fc2.weight", (8, 6)),
    ("embedding.word_embeddings.weight", (16, 8)),
    ("decoder.layers.0.input_layernorm.weight", (8,)),
])
@pytest.mark.parametrize("tp", [1, 2])
def test_shard_unshard_roundtrip(name, shape, tp):
    full = torch.randn(shape)
    shards = [convert.shard(name, full, r, tp) for r in range(tp)]
    assert torch.equal(convert.unshard(name, shards), full)


def test_fc1_shard_holds_its_gate_and_up_rows():
    gate, up = torch.arange(4.0)[:, None], torch.arange(10.0, 14.0)[:, None]
    full = torch.cat([gate, up])
    s1 = convert.shard("decoder.layers.0.mlp.linear_fc1.weight", full, 1, 2)
    assert s1[:, 0].tolist() == [2, 3, 12, 13]


def test_qkv_tp_shard_holds_whole_groups():
    arch = _arch(heads=4, kv=2, head_dim=1, hidden=1)
    q, k, v = torch.arange(4.0)[:, None], torch.tensor([[20.0], [21.0]]), torch.tensor([[30.0], [31.0]])
    fused = convert.fuse_qkv(q, k, v, arch)
    assert convert.shard("x.linear_qkv.weight", fused, 1, 2)[:, 0].tolist() == [2, 3, 21, 31]


def test_vocab_padding_and_tied_output():
    arch = _arch(tied=True)
    hf = {"model.embed_tokens.weight": torch.randn(10, 8)}
    emb = convert.mcore_from_hf("embedding.word_embeddings.weight", hf.__getitem__, arch, 16)
    out = convert.mcore_from_hf("output_layer.weight", hf.__getitem__, arch, 16)
    assert emb.shape == (16, 8) and torch.equal(emb[:10], hf["model.embed_tokens.weight"])
    assert torch.equal(emb[10:], torch.zeros(6, 8)) and torch.equal(out, emb)
    assert convert.hf_from_mcore("output_layer.weight", out, arch) == []  # tied: HF stores no lm_head
    (name, back), = convert.hf_from_mcore("embedding.word_embeddings.weight", emb, arch)
    assert name == "model.embed_tokens.weight" and torch.equal(back, hf["model.embed_tokens.weight"])


def test_transformer_engine_names_map_to_local():
    assert convert.canonical("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert convert.canonical("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.3.pre_mlp_layernorm.weight"


def test_unknown_tensor_is_named():
    with pytest.raises(KeyError, match="decoder.layers.0.mystery.weight"):
        convert.mcore_from_hf("decoder.layers.0.mystery.weight", {}.__getitem__, _arch(), 16)


def test_special_token_ids_and_generation_config_survive_import_export(tmp_path):
    import json

    from rlv_megatron.models.hf_config import arch_from_hf, generation_config_from_arch, hf_config_from_arch, load_arch

    cfg = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 6, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": [2, 5],
           "pad_token_id": 0, "unk_token_id": 3, "decoder_start_token_id": 1, "sep_token_id": None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = load_arch(tmp_path)
    out = hf_config_from_arch(arch)
    ids = {k: v for k, v in cfg.items() if k.endswith("_token_id")}
    assert {k: out[k] for k in ids} == ids
    assert arch_from_hf(out) == arch  # export -> import is lossless
    # no generation_config.json in the source: one from the ids, so generation stops at EOS
    assert generation_config_from_arch(arch) == {"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0}
    gen = {"eos_token_id": [2, 5], "pad_token_id": 0, "temperature": 0.7, "top_p": 0.8}
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    assert generation_config_from_arch(load_arch(tmp_path)) == gen  # the source's, as it was
