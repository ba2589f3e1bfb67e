"""rlv-megatron: RL^V on megatron-core + vLLM."""
