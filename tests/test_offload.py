"""train/offload.py: the training state off the device while the engine is awake and back, bit for bit (on
CPU, with the device and the host both the CPU: the moving code is the GPU's); training after the round trip
repeats training without it; the bytes it frees are the plan's grads and optimizer terms; the loop frees them
before the engine wakes."""

import types

import pytest
import torch

from tests.distributed import run_distributed_in_turn
from tests.test_checkpoint import _step


def _policy(model_dir):
    """bf16 weights with the distributed optimizer over the ranks (DP = world size): fp32 master copies."""
    from rlv_megatron.config import Config
    from rlv_megatron.train.policy import Policy

    cfg = Config()
    cfg.model.path, cfg.model.params_dtype = str(model_dir), "bfloat16"
    cfg.parallel.distributed_optimizer = True
    cfg.optim.lr, cfg.optim.eps = 1e-3, 1e-6
    return Policy(cfg)


def _optimizer_tensors(policy):
    """Every tensor of the optimizer's state and its fp32 master copies (independent of offload.py's lists)."""
    out = []
    for opt in policy.optimizer.chained_optimizers:
        for g in opt.optimizer.param_groups:
            for p in g["params"]:
                out += [p, *(t for t in opt.optimizer.state[p].values() if torch.is_tensor(t))]
    return out


def train_with_round_trip(model_dir, mode):
    """A step, then (mode) nothing / an offload and reload / an offload that the next train step undoes by
    itself; then two steps. Returns the steps, the weights, the optimizer tensors and what the round trip saw."""
    from rlv_megatron.train.offload import StateOffload, _grad_buffers

    policy = _policy(model_dir)
    steps = [_step(policy)]
    seen = {}
    if mode != "none":
        off = policy.rollout_offload = StateOffload(device="cpu", host="cpu")
        before = [t.detach().clone() for t in _optimizer_tensors(policy)]
        old = [t.data for t in _optimizer_tensors(policy)]  # held: the allocator cannot reuse their addresses
        ptrs = {t.data_ptr() for t in old}
        seen["bytes"] = dict(off.offload(policy.chunks, policy.optimizer))
        now = _optimizer_tensors(policy)
        # nothing left in the old storage but the fp32 weights' own shards (views of the weights, which stay)
        weights = {p.untyped_storage().data_ptr() for p in policy.model.parameters()}
        kept = [t for t in now if t.data_ptr() in ptrs]
        seen["all_moved"] = bool(kept) and all(t.untyped_storage().data_ptr() in weights for t in kept)
        seen["equal_on_host"] = all(torch.equal(a, b) for a, b in zip(before, now))
        seen["grad_storage"] = [g.untyped_storage().nbytes() for g in _grad_buffers(policy.chunks)]
        seen["twice"] = off.offload(policy.chunks, policy.optimizer) == seen["bytes"] and off.offloaded
        if mode == "reload":
            off.reload()
            seen["equal_back"] = all(torch.equal(a, b) for a, b in zip(before, _optimizer_tensors(policy)))
            seen["grads_zero"] = all(not g.any() for g in _grad_buffers(policy.chunks))
    steps += [_step(policy), _step(policy)]
    model = {k: v.clone() for k, v in policy.model.state_dict().items() if torch.is_tensor(v)}
    return steps, model, [t.detach().clone() for t in _optimizer_tensors(policy)], seen


@pytest.mark.slow
def test_offload_round_trip_leaves_training_unchanged(tiny_models):
    model = tiny_models["qwen2"]
    base, *outs = run_distributed_in_turn(train_with_round_trip, 2, [(model, m) for m in ("none", "reload", "step")])
    for mode, out in zip(("reload", "step"), outs):
        for (steps, model, opt, seen), (steps0, model0, opt0, _) in zip(out, base):
            assert seen["all_moved"] and seen["equal_on_host"] and seen["twice"]
            assert seen["grad_storage"] and all(n == 0 for n in seen["grad_storage"])
            if mode == "reload":
                assert seen["equal_back"] and seen["grads_zero"]
            assert steps == steps0, mode  # the statistics, grad norm included, exactly
            assert model.keys() == model0.keys() and all(torch.equal(model[k], model0[k]) for k in model)
            assert len(opt) == len(opt0) and all(torch.equal(a, b) for a, b in zip(opt, opt0))
    # what is freed is what `rlv plan` leaves out of the generation phase: its grads and optimizer terms
    from rlv_megatron.config import Config, apply_overrides
    from rlv_megatron.models.hf_config import load_arch
    from rlv_megatron.plan import DEVICES, estimate

    cfg = apply_overrides(Config(), ["model.params_dtype=bfloat16", "parallel.distributed_optimizer=true"])
    p = estimate(cfg, load_arch(tiny_models["qwen2"]), DEVICES["cpu"], world_size=2)
    freed = out[0][3]["bytes"]
    assert freed["grads"] == pytest.approx(p.memory["grads"], rel=0.03)  # megatron pads its buffers
    assert freed["optimizer"] == pytest.approx(p.memory["optimizer"], rel=0.03)


def test_sync_frees_the_training_state_before_the_engine_wakes(monkeypatch):
    """The loop's order: the state leaves before wake_up (and the engine sees it gone); a train step brings it
    back. A fake engine and optimizer; offload.active forced on (it is off without a GPU)."""
    from rlv_megatron.config import Config, apply_overrides
    from rlv_megatron.dashboards import Metrics
    from rlv_megatron.rollout.placement import Placement
    from rlv_megatron.train import loop, offload

    state = {"exp_avg": torch.arange(6.0)}
    inner = types.SimpleNamespace(state={"p": state}, param_groups=[])
    policy = types.SimpleNamespace(
        cfg=apply_overrides(Config(), ["rollout.enable_sleep_mode=true"]), chunks=[],
        optimizer=types.SimpleNamespace(optimizer=inner), rollout_offload=offload.StateOffload("cpu", "cpu"))
    calls = []

    class Engine:
        def wake_up(self):
            calls.append(("wake_up", policy.rollout_offload.offloaded))

        def update_weights(self, weights):
            list(weights)
            return types.SimpleNamespace(seconds=0.0, bytes=0)

    monkeypatch.setattr(offload, "active", lambda cfg: True)
    monkeypatch.setattr(loop, "stream_weights", lambda policy, place: iter(()))
    ptr = state["exp_avg"].data_ptr()
    loop.sync_weights(policy, Engine(), Placement(), Metrics(None))
    assert calls == [("wake_up", True)] and state["exp_avg"].data_ptr() != ptr
    offload.ensure_resident(policy)  # what Policy.train_step calls first
    assert not policy.rollout_offload.offloaded and torch.equal(state["exp_avg"], torch.arange(6.0))
    monkeypatch.setattr(offload, "active", lambda cfg: False)  # off (and on CPU): nothing moves
    loop.sync_weights(policy, Engine(), Placement(), Metrics(None))
    assert calls[-1] == ("wake_up", False)
