"""Build the policy: a megatron-core GPTModel (one chunk per virtual pipeline stage) from a ModelArch.

Local layer spec on CPU, TransformerEngine spec on GPU (optionally FP8), selected by `model.impl`.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from rlv_megatron.config import ConfigError, ModelConfig, ParallelConfig
from rlv_megatron.models.hf_config import ModelArch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def te_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_impl(model_cfg: ModelConfig) -> str:
    if model_cfg.impl == "auto":
        return "te" if te_available() else "local"
    if model_cfg.impl == "te" and not te_available():
        raise ConfigError("model.impl=te: TransformerEngine with a CUDA GPU is required (use impl=local on CPU)")
    return model_cfg.impl


def shares_prompts(train_cfg, impl: str) -> bool:
    """train.share_prompts as it takes effect: TransformerEngine's THD attention cannot let several sequences
    attend to one shared prefix, so under impl=te every sample keeps its own copy of the prompt."""
    return bool(train_cfg.share_prompts) and impl != "te"


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def transformer_config(arch: ModelArch, par: ParallelConfig, model_cfg: ModelConfig, impl: str):
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = _DTYPES[model_cfg.params_dtype]
    fp8 = {}
    if model_cfg.fp8 is not None:
        fp8 = dict(fp8=model_cfg.fp8, fp8_recipe=model_cfg.fp8_recipe, fp8_margin=model_cfg.fp8_margin,
                   fp8_amax_history_len=model_cfg.fp8_amax_history_len,
                   fp8_amax_compute_algo=model_cfg.fp8_amax_compute_algo)
    on_gpu = torch.cuda.is_available()
    recompute = {}
    if par.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif par.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        init_method_std=0.02,
        # fusions need CUDA kernels; TE brings its own
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_backend=AttnBackend.auto if impl == "te" else AttnBackend.local,
        # gloo point-to-point: batched p2p with PP=2 pairs prev/next as the same peer (silently wrong loss)
        batch_p2p_comm=on_gpu,
        **fp8,
        **recompute,
    )


def layer_spec(arch: ModelArch, impl: str, attention: str = "sdpa"):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if impl == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec()
    from rlv_megatron.models.attention import DenseMaskAttention, SDPAttention

    spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    core = SDPAttention if attention == "sdpa" else DenseMaskAttention
    spec.submodules.self_attention.submodules.core_attention = core
    return spec


def build_model(arch: ModelArch, par: ParallelConfig, model_cfg: ModelConfig) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage held by this rank (a list of one without vpp).

    Requires megatron parallel state (see rlv_megatron.dist.init_megatron)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from rlv_megatron.models.rope import use_vectorised_thd_rope

    impl = resolve_impl(model_cfg)
    use_vectorised_thd_rope()
    config = transformer_config(arch, par, model_cfg, impl)
    spec = layer_spec(arch, impl, model_cfg.local_attention)
    vocab = padded_vocab_size(arch.vocab_size, model_cfg.make_vocab_size_divisible_by, par.tp)
    chunks = []
    for vp in range(par.vpp or 1):
        vp_stage = vp if par.vpp else None
        chunks.append(GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,
            vp_stage=vp_stage,
        ))
    return chunks
