"""Engines on GPUs of their own (rollout.engine_gpus > 0): which GPUs each engine gets, the environment its
processes start with, the weight transport it uses, the plan's layout checks and the launchers' rank counts.
The engines themselves run only on GPUs, which this machine has none of; every part up to that is tested here."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from rlv_megatron import plan
from rlv_megatron.config import Config, ConfigError, RolloutConfig, apply_overrides, validate
from rlv_megatron.rollout import engine as engine_mod
from rlv_megatron.rollout.placement import Placement, engine_devices, engine_gpu_ids

ROOT = Path(__file__).resolve().parents[1]


def _rollout(**kw) -> RolloutConfig:
    return RolloutConfig(**{"engine_gpus": 4, "tensor_parallel_size": 2, **kw})


def test_each_engine_owner_of_a_node_gets_its_own_gpus_after_the_trainers():
    ro = _rollout()
    # 4 trainer ranks on the node (TP=2 x DP=2: owners are ranks 0 and 2), 8 GPUs
    assert engine_gpu_ids([0, 2], 0, 4, 8, ro) == [4, 5]
    assert engine_gpu_ids([2, 0], 2, 4, 8, ro) == [6, 7]  # by rank, whatever order they arrive in
    assert engine_gpu_ids([0, 2], 1, 4, 8, ro) == []  # not an owner
    # the second node of a run: global ranks 4..7, owners 4 and 6
    assert engine_gpu_ids([4, 6], 6, 4, 8, ro) == [6, 7]
    assert engine_gpu_ids([8], 8, 4, 8, _rollout(tensor_parallel_size=4)) == [4, 5, 6, 7]


def test_a_node_that_cannot_hold_its_engines_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"rollout.engine_gpus=4: this node's 3 engines .* need 6 GPUs"):
        engine_gpu_ids([0, 1, 2], 0, 4, 8, _rollout())
    with pytest.raises(ConfigError, match=r"rollout.engine_gpus=4: this node has 8 GPUs and 6 trainer ranks"):
        engine_gpu_ids([0], 0, 6, 8, _rollout())


def test_engine_devices_is_none_on_cpu_and_refused_without_gpus():
    """On GPU every engine gets devices, colocated ones too (tests/test_gpu_rules.py); on CPU none."""
    assert engine_devices(Placement(), RolloutConfig()) is None
    with pytest.raises(ConfigError, match="rollout.engine_gpus=4: engines on GPUs of their own need GPUs"):
        engine_devices(Placement(), _rollout())


@pytest.mark.parametrize("before", [None, "0,1,2,3,4,5,6,7"])
def test_devices_env_is_set_for_the_spawn_and_restored(monkeypatch, before):
    if before is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", before)
    with engine_mod.environment(engine_mod.devices_env(["6", "7"])):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
    with pytest.raises(RuntimeError), engine_mod.environment(engine_mod.devices_env(["3"])):
        raise RuntimeError("the engine failed to start")
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # restored on failure too
    with engine_mod.environment(engine_mod.devices_env(None)):  # CPU: untouched
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == before


def test_the_engine_starts_on_its_devices_and_picks_ipc_only_where_it_sees_the_trainers_gpu(monkeypatch):
    seen = []

    class FakeLLM:  # stands in for vllm.LLM, which spawns its engine core with the environment it sees
        def __init__(self, **kwargs):
            seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setattr(engine_mod, "_env_for_cpu", lambda cfg: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    # as on a GPU node: the owner is the trainer rank on cuda:2 (rollout/placement.py own_gpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    disagg = engine_mod.make_engine("vllm", "model-dir", _rollout(), ["4", "5"])
    assert seen[-1] == "4,5" and "CUDA_VISIBLE_DEVICES" not in os.environ
    disagg.on_gpu = True  # the trainer's IPC buffer is on a GPU the engine does not see
    assert disagg._transport() == "shm"
    # colocated (math_7b's second replica): its replica's GPUs, the owner's first; its workers see the buffer
    colocated = engine_mod.make_engine("vllm", "model-dir", RolloutConfig(tensor_parallel_size=2), ["2", "3"])
    colocated.on_gpu = True
    assert seen[-1] == "2,3" and colocated._transport() == "cuda_ipc"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: it would run on this process's cuda:0
    with pytest.raises(ValueError, match="an engine on GPUs 2,3 needs vLLM's engine in its own process"):
        engine_mod.make_engine("vllm", "model-dir", RolloutConfig(), ["2", "3"])


@pytest.mark.parametrize("override, message", [
    ("rollout.engine_gpus=3", "not a multiple of rollout.tensor_parallel_size=2"),
    ("rollout.enable_sleep_mode=true", "nothing to free"),
    ("rollout.transport=cuda_ipc", "use shm"),
    ("rollout.engine_gpus=-1", "must be >= 0"),
])
def test_config_refuses_what_disaggregation_cannot_do(override, message):
    cfg = apply_overrides(Config(), ["rollout.engine_gpus=4", "rollout.tensor_parallel_size=2", override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_plan_trains_on_the_rest_and_checks_where_the_engines_go():
    arch = plan.PRESETS["qwen2.5-math-7b"]
    common = ["parallel.tp=2", "parallel.recompute=full", "model.params_dtype=bfloat16",
              "rollout.tensor_parallel_size=2", "rollout.gpu_memory_utilization=0.9"]
    colocated = plan.estimate(apply_overrides(Config(), common), arch, plan.DEVICES["h100-80gb"], 8)
    disagg = plan.estimate(apply_overrides(Config(), common + ["rollout.engine_gpus=4"]), arch,
                           plan.DEVICES["h100-80gb"], 8)
    # half the GPUs train: half the training throughput, optimizer states over DP=2 instead of 4
    assert disagg.throughput["train tokens/s (cluster)"] == pytest.approx(
        colocated.throughput["train tokens/s (cluster)"] / 2)
    assert disagg.memory["optimizer"] == pytest.approx(2 * colocated.memory["optimizer"])
    engine = disagg.memory["engine_weights"] + disagg.memory["engine_kv"]
    assert engine == pytest.approx(0.9 * 80 * plan.GiB)
    assert disagg.total == pytest.approx(max(engine, sum(disagg.memory.values()) - engine)) and disagg.fits
    assert any("4 of the 8 GPUs train" in n for n in disagg.notes)
    # pipeline stage 0 on node 0 only: both replicas' engines go on node 0's engine GPUs, node 1's idle
    pp2 = common + ["parallel.pp=2", "rollout.engine_gpus=4"]
    assert plan.engines_per_node(apply_overrides(Config(), pp2), 4, 2) == [2, 0]
    fits = plan.estimate(apply_overrides(Config(), pp2), arch, plan.DEVICES["h100-80gb"], 16)
    assert fits.fits and any("4 engine GPU(s) idle" in n for n in fits.notes)
    wide = plan.estimate(apply_overrides(Config(), pp2 + ["rollout.tensor_parallel_size=4"]), arch,
                         plan.DEVICES["h100-80gb"], 16)
    assert not wide.fits and "a node holds the first ranks of 2 data-parallel replicas" in wide.problems[0]
    with pytest.raises(ConfigError, match="not whole nodes of 8"):
        plan.estimate(apply_overrides(Config(), common + ["rollout.engine_gpus=4"]), arch,
                      plan.DEVICES["h100-80gb"], 12)


def test_rlv_plan_prints_the_trainer_layout():
    from tests.cli import rlv

    out = rlv("plan", "qwen2.5-math-7b", "--gpus", "8", "parallel.tp=2", "parallel.recompute=full",
              "model.params_dtype=bfloat16", "rollout.tensor_parallel_size=2", "rollout.engine_gpus=4",
              "rollout.gpu_memory_utilization=0.9")
    assert out.returncode == 0, out.stderr
    assert "TP=2 PP=1 DP=2" in out.stdout and "trainer GPUs hold" in out.stdout


@pytest.mark.parametrize("engine_gpus, ranks", [(None, 8), ("4", 4)])
def test_slurm_launch_starts_one_rank_per_trainer_gpu(tmp_path, engine_gpus, ranks):
    """common.sh's launch_torchrun under a fake Slurm job: torchrun's rank count and the override it passes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "t", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
           "RLV_RUN_ROOT": str(tmp_path)}
    if engine_gpus is not None:
        env["ENGINE_GPUS"] = engine_gpus
    script = ('source slurm/common.sh; launch() { shift 3; printf "%s\\n" "$@" > "$RLV_RUN_ROOT/args"; }; '  # drops: bash -c PROGRAM
              'launch_torchrun recipes/math_7b.py method=loo_ppo_v')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[0] == str(ranks) and args[1] == "recipes/math_7b.py"
    assert f"rollout.engine_gpus={engine_gpus or 0}" in args and args[-1] == "method=loo_ppo_v"
