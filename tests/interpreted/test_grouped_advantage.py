"""kernels/grouped_advantage under the Triton interpreter against the PyTorch reference (fp32).
Run by tests/test_kernels.py in a process started with TRITON_INTERPRET=1 (see there)."""

import os

import pytest
import torch

from rlv_megatron.algos.advantages import compute_advantages

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from process start (tests/test_kernels.py runs it so)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def ga():
    import kernels.grouped_advantage as module

    return module


CASES = {
    "sizes_differ_unsorted": ([1, 0, 1, 1, 0, 0, 1, 0.5, 0.25], [2, 0, 2, 1, 0, 1, 3, 2, 0]),
    "group_of_one": ([1.0, 0.0, 1.0], [0, 1, 1]),
    "all_equal": ([1.0, 1.0, 1.0, 0.0, 0.0], [0, 0, 0, 1, 1]),
    "empty_group_ids_gap": ([0.3, 0.9, 0.1, 0.7], [0, 0, 5, 5]),  # groups 1-4 absent (filtered)
}


@pytest.mark.parametrize("case", list(CASES))
def test_all_three_estimators_equal_the_reference(ga, case):
    r, g = CASES[case]
    rewards, groups = torch.tensor(r, dtype=torch.float32), torch.tensor(g)
    got = ga.all_advantages_triton(rewards, groups)
    for row, name in enumerate(ga.ESTIMATORS):
        ref = compute_advantages(name, rewards, groups)
        assert torch.allclose(got[row], ref, atol=1e-5), (name, got[row], ref)
        assert torch.allclose(compute_advantages(name, rewards, groups, use_triton=True), ref, atol=1e-5)


def test_random_groups_and_token_broadcast(ga):
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 7, (50,), generator=g)
    rewards = torch.rand(50, generator=g)
    got = ga.all_advantages_triton(rewards, groups)
    assert torch.allclose(got[0], compute_advantages("grpo", rewards, groups), atol=1e-5)
    mask = torch.rand(50, 37, generator=g) > 0.4  # T not a multiple of the block
    mask[3] = False  # an empty mask row
    tok = ga.token_advantages_triton(got[1], mask, block_t=16)
    assert torch.allclose(tok, ga.token_advantages_reference(got[1], mask))
    assert tok[3].abs().max() == 0


def test_bad_inputs_are_named(ga):
    with pytest.raises(ValueError, match="1-D of the same length"):
        ga.all_advantages_triton(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids integer"):
        ga.all_advantages_triton(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="algo.advantage=.ppo.: unknown"):  # the registry names it
        compute_advantages("ppo", torch.zeros(3), torch.zeros(3, dtype=torch.long), use_triton=True)
