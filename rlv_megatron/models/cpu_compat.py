"""Everything megatron-core needs to train on a CPU over gloo, in one place.

Applied only when no GPU is present (`apply_if_no_gpu`). Each patch replaces a named megatron-core or
torch.cuda attribute; `PATCHED_INTERNALS` lists them so a test fails loudly when a megatron-core upgrade
renames or removes one (the patch would otherwise silently stop applying). Facts: docs/cpu-stack.md.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.overrides import TorchFunctionMode

# (module path, attribute) pairs this module replaces or relies on.
PATCHED_INTERNALS = [
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "initialize_rng_tracker"),
    ("megatron.core.transformer.torch_norm", "WrappedTorchNorm"),
    ("megatron.core.models.backends", "WrappedTorchNorm"),
    ("megatron.core.transformer.transformer_block", "LayerNormImpl"),
    ("megatron.core.models.gpt.gpt_layer_specs", "LNImpl"),
    ("torch.cuda", "current_device"),
    ("torch.cuda", "synchronize"),
    ("torch.cuda", "get_rng_state"),
    ("torch.cuda", "set_rng_state"),
    ("torch.cuda", "manual_seed"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._set_main_param_and_optimizer_states"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.load_state_dict"),
]

_applied = False
_mode: TorchFunctionMode | None = None


def _cpu_get_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


def _make_cpu_tracker(base: type) -> type:
    class CpuRNGStatesTracker(base):
        """Megatron's RNG tracker on the CPU generator: named states are swapped in and out of it."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


class _CudaToCpuMode(TorchFunctionMode):
    """Maps device="cuda", .cuda() and .to("cuda") to the CPU, drops pin_memory, and makes
    Tensor.type() report torch.cuda.*Tensor (megatron's optimizer compares that string)."""

    @staticmethod
    def _is_cuda(dev) -> bool:
        if isinstance(dev, torch.device):
            return dev.type == "cuda"
        if isinstance(dev, str):
            return dev.startswith("cuda")
        return isinstance(dev, int) and not isinstance(dev, bool)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and self._is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and self._is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args, **kwargs).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _sequence_parallel_norm(base_norm):
    """torch norms assert on sequence_parallel; build with it off and tag the params so that
    megatron all-reduces their grads over TP (what TE's norms do on GPU)."""

    class SequenceParallelTorchNorm:
        def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
            if not config.sequence_parallel:
                return base_norm(config, hidden_size, eps, **kwargs)
            cfg = copy.copy(config)
            cfg.sequence_parallel = False
            norm = base_norm(cfg, hidden_size, eps, **kwargs)
            for p in norm.parameters():
                p.sequence_parallel = True
            return norm

    return SequenceParallelTorchNorm


def _torch_adam_state_loader(original):
    """Without apex/TE the distributed optimizer wraps torch's Adam, whose per-parameter state has a "step";
    loading a fully_reshardable checkpoint hands over every state but "step" (restored separately by
    load_state_dict) and then copies every key of the destination: KeyError 'step'. Copy what was given."""
    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)

    return set_states


def _unshared_adam_steps(original):
    """The same path gives every parameter's state one shared "step" tensor, which torch's Adam then
    increments in place once per parameter: after a resume the bias corrections drift. One copy each."""
    def load_state_dict(self, state_dict):
        original(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    return load_state_dict


def apply() -> None:
    """Install all CPU patches (idempotent). Call after init_process_group, before building a model."""
    global _applied, _mode
    if _applied:
        return
    import megatron.core.models.backends as backends
    import megatron.core.models.gpt.gpt_layer_specs as gpt_specs
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.torch_norm as torch_norm
    import megatron.core.transformer.transformer_block as transformer_block

    mrandom.CudaRNGStatesTracker = _make_cpu_tracker(mrandom.CudaRNGStatesTracker)
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    mrandom.initialize_rng_tracker(force_reset=True)

    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if not HAVE_APEX_OR_TE:
        DistributedOptimizer._set_main_param_and_optimizer_states = _torch_adam_state_loader(
            DistributedOptimizer._set_main_param_and_optimizer_states)
        DistributedOptimizer.load_state_dict = _unshared_adam_steps(DistributedOptimizer.load_state_dict)

    torch_norm_cls = torch_norm.WrappedTorchNorm
    sp_norm = _sequence_parallel_norm(torch_norm_cls)
    for module, attr in [(torch_norm, "WrappedTorchNorm"), (backends, "WrappedTorchNorm"),
                         (backends, "LNImpl"), (transformer_block, "LayerNormImpl"), (gpt_specs, "LNImpl")]:
        if getattr(module, attr, None) is torch_norm_cls:  # apex/TE norms, where present, stay
            setattr(module, attr, sp_norm)

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    torch.cuda.manual_seed = torch.manual_seed

    _mode = _CudaToCpuMode()
    _mode.__enter__()  # process-wide for the life of the process
    _applied = True


def apply_if_no_gpu() -> bool:
    """Apply the CPU patches when CUDA is unavailable; return whether they were applied."""
    if torch.cuda.is_available():
        return False
    apply()
    return True
