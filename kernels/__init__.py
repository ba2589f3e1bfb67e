"""Triton kernels with PyTorch references."""
