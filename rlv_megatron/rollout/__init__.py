"""Rollout: the vLLM engine, weight transport and the worker extension."""
