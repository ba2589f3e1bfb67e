"""Config and HF-config validation: bad values fail at start-up with the field named."""

import json

import pytest

from rlv_megatron.config import Config, ConfigError, validate
from rlv_megatron.models.hf_config import UnsupportedConfig, arch_from_hf, hf_config_from_arch, load_arch

QWEN = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "tie_word_embeddings": True}


def test_qwen2_arch_reads_theta_bias_and_tying():
    arch = arch_from_hf(QWEN)
    assert (arch.rope_theta, arch.qkv_bias, arch.tie_word_embeddings, arch.head_dim) == (1e6, True, True, 32)
    assert arch_from_hf(hf_config_from_arch(arch)) == arch  # export -> import is lossless


def test_llama_legacy_rope_theta_and_llama3_scaling():
    cfg = {**QWEN, "model_type": "llama", "rope_theta": 5e5, "rope_parameters": None,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    arch = arch_from_hf(cfg)
    assert (arch.rope_theta, arch.rope_scaling_factor, arch.qkv_bias) == (5e5, 8.0, False)


@pytest.mark.parametrize("change,field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}}, "low_freq_factor"),
])
def test_unsupported_hf_config_names_the_field(change, field):
    with pytest.raises(UnsupportedConfig, match=field):
        arch_from_hf({**QWEN, **change})


def test_bad_config_json_names_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n "model_type": "qwen2",\n oops\n}')
    with pytest.raises(UnsupportedConfig, match=r"config.json:3"):
        load_arch(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_arch(tmp_path / "nowhere")


@pytest.mark.parametrize("setting,field", [
    (("parallel", "tp", 3), "parallel.tp=3: num_attention_heads"),
    (("parallel", "pp", 3), "parallel.pp=3"),
    (("parallel", "sequence_parallel", True), "parallel.sequence_parallel"),
    (("model", "fp8", "e5m2"), "model.fp8"),
    (("rollout", "transport", "tcp"), "rollout.transport"),
    (("rollout", "weight_bucket_mb", 0), "rollout.weight_bucket_mb"),
    (("sft", "min_lr_ratio", 1.5), "sft.min_lr_ratio"),
])
def test_invalid_config_names_the_field(setting, field):
    cfg = Config()
    group, name, value = setting
    setattr(getattr(cfg, group), name, value)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(cfg, arch_from_hf(QWEN))


def test_fp8_needs_transformer_engine_spec():
    cfg = Config()
    cfg.model.fp8, cfg.model.impl = "hybrid", "local"
    with pytest.raises(ConfigError, match="model.impl=te"):
        validate(cfg)


def test_default_config_is_valid():
    validate(Config(), arch_from_hf(json.loads(json.dumps(QWEN))))
