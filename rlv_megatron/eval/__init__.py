"""`rlv eval`: test-time scaling evaluation (pools, equivalence grouping, sequential scaling, outputs)."""

from rlv_megatron.eval.app import run  # noqa: F401
