"""Policy models: Megatron builders, HF conversion, CPU compatibility."""
