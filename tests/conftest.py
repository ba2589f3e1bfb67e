import os

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Triton kernels run interpreted in a child pytest started with TRITON_INTERPRET=1 (tests/test_kernels.py)
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["interpreted"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Random tiny HF models written by transformers: the independent reference for conversion tests."""
    from rlv_megatron.models.tiny import make_hf_model

    root = tmp_path_factory.mktemp("hf")
    return {
        "qwen2": make_hf_model("qwen2", root / "qwen2", seed=1),
        "llama": make_hf_model("llama", root / "llama", seed=2, rope_theta=500000.0),
        "qwen2_tied": make_hf_model("qwen2", root / "qwen2_tied", seed=3, tie_word_embeddings=True),
        "llama_tied": make_hf_model("llama", root / "llama_tied", seed=4, tie_word_embeddings=True),
    }
