"""kernels/verifier_loss's Triton kernels under the interpreter against the chunked PyTorch reference and the
full-logits definition (fp32, within 1e-5). Run by tests/test_kernels.py with TRITON_INTERPRET=1."""

import os

import pytest
import torch

from kernels.verifier_loss import fused_logprobs, naive_logprobs
from tests.test_fused_logprob import assert_tp_equals_one_rank, problem, value_and_grads

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from process start (tests/test_kernels.py runs it so)",
                allow_module_level=True)


def path(use_triton, chunk):
    return lambda h, w, t, v, temps: fused_logprobs(h, w, t, v, temps, chunk=chunk, use_triton=use_triton)


@pytest.mark.parametrize("n, v, k, chunk", [
    (37, 2500, 3, 16),  # vocabulary over two kernel blocks of 1024 and a ragged third; ragged last row chunk
    (5, 50, 0, 5),  # one target per row, one chunk, a single partial block
    (1, 7, 3, 4),  # one row
])
def test_triton_equals_reference_and_definition(n, v, k, chunk):
    p = problem(n=n, v=v, k=k, dtype=torch.float32, seed=n)
    got = value_and_grads(path(True, chunk), *p)
    ref = value_and_grads(path(False, chunk), *p)
    full = value_and_grads(naive_logprobs, *p)
    for name, a, b, c in zip(("logp", "entropy", "d hidden", "d weight"), got, ref, full):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name
        assert torch.allclose(a, c, atol=1e-5, rtol=1e-5), name


def test_triton_peaked_rows_stay_finite():
    """A row whose logits span a huge range (one dominates): the online max/sum-exp must not overflow."""
    h, w, t, v, temps, up = problem(n=4, v=300, k=3, dtype=torch.float32)
    with torch.no_grad():
        w[7] *= 200.0
    got = value_and_grads(path(True, 3), h, w, t, v, temps, up)
    full = value_and_grads(naive_logprobs, h, w, t, v, temps, up)
    for a, c in zip(got, full):
        assert torch.isfinite(a).all() and torch.allclose(a, c, atol=1e-4, rtol=1e-5)


def test_triton_tp2_equals_one_rank():
    assert_tp_equals_one_rank(use_triton=True)
