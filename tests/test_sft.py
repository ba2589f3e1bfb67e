"""The warm start's learning-rate schedule: linear warm-up, cosine decay to the floor at the last step."""

import math

import pytest

from rlv_megatron.config import SFTConfig
from rlv_megatron.train.sft import sft_lr


def test_warmup_then_cosine_to_the_floor():
    cfg = SFTConfig(steps=120, lr=2e-3, warmup_steps=20, min_lr_ratio=0.1)
    assert sft_lr(0, cfg) == pytest.approx(2e-3 / 20)
    assert sft_lr(19, cfg) == pytest.approx(2e-3)  # peak reached at the end of warm-up
    mid = 20 + (120 - 20 - 1) / 2  # half-way through the decay: the mean of peak and floor
    assert sft_lr(math.floor(mid), cfg) > 1.1e-3 > sft_lr(math.ceil(mid), cfg)
    assert sft_lr(119, cfg) == pytest.approx(2e-4)  # the last step trains at the floor
    lrs = [sft_lr(s, cfg) for s in range(20, 120)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_warmup_starts_at_the_peak():
    cfg = SFTConfig(steps=10, lr=1e-3, warmup_steps=0, min_lr_ratio=0.0)
    assert sft_lr(0, cfg) == pytest.approx(1e-3) and sft_lr(9, cfg) == pytest.approx(0.0, abs=1e-12)
