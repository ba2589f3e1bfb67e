"""The cluster recipes (math_7b, r1_32b): their configs compose with every method, validate against the
real architectures, fit the documented hardware by `rlv plan` with the memory their headers state (its
weights, grads, optimizer and engine terms checked against arithmetic from the model's shape), and
`--cfg job --resolve` prints the resolved config with overrides."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlv_megatron import plan
from rlv_megatron.config import ConfigError, validate
from rlv_megatron.hydra_app import compose
from rlv_megatron.tasks.math_data import load_math

ROOT = Path(__file__).resolve().parents[1]
# recipe -> (architecture preset, GPUs, the per-GPU GiB its header and docstring state)
RECIPES = {"math_7b": ("qwen2.5-math-7b", 8, 55.1), "r1_32b": ("r1-distill-qwen-32b", 16, 63.6),
           "math_7b_overlap": ("qwen2.5-math-7b", 8, 75.9), "r1_32b_overlap": ("r1-distill-qwen-32b", 16, 78.5),
           "math_7b_disagg": ("qwen2.5-math-7b", 8, 72.0), "r1_32b_disagg": ("r1-distill-qwen-32b", 32, 77.5)}
METHODS = {"grpo_v": ("grpo", "token_mean"), "loo_ppo_v": ("rloo", "token_mean"),
           "dr_grpo_v": ("dr_grpo", "constant")}
# Hugging Face's parameter counts on the model pages (Qwen/Qwen2.5-Math-7B: 7.62B, deepseek-ai/
# DeepSeek-R1-Distill-Qwen-32B: 32.8B), rounded to 3 digits there
PUBLISHED_PARAMS = {"qwen2.5-math-7b": 7.62e9, "r1-distill-qwen-32b": 32.8e9}
TERMS_REL = 1e-3  # the reference below against plan.estimate's terms (plan.py splits the norms over TP too: <2e-4)


# An independent reference for the dominant memory terms, from each architecture's config.json shape (written
# here, not with plan.py's functions): parameters by Hugging Face module, sharded as megatron-core shards them.
def hf_params(arch) -> tuple[int, int, int]:
    """(one decoder layer's TP-sharded parameters, its replicated ones, embedding rows x hidden)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    bias = 1 if arch.qkv_bias else 0
    q_proj = h * arch.num_heads * d + bias * arch.num_heads * d
    k_proj = v_proj = h * arch.num_kv_heads * d + bias * arch.num_kv_heads * d  # GQA: kv_heads, not heads
    o_proj = arch.num_heads * d * h
    gate_proj = up_proj = down_proj = h * f
    norms = h + h  # input_layernorm, post_attention_layernorm
    return q_proj + k_proj + v_proj + o_proj + gate_proj + up_proj + down_proj, norms, arch.vocab_size * h


def hf_total_params(arch) -> int:
    sharded, norms, emb = hf_params(arch)
    lm_head = 0 if arch.tie_word_embeddings else emb
    return arch.num_layers * (sharded + norms) + emb + lm_head + arch.hidden_size  # + the final norm


def reference_memory(cfg, arch, gpus: int, gpus_per_node: int = 8) -> dict[str, float]:
    """Bytes per GPU of the first pipeline stage (what `rlv plan` reports): weights, grads, optimizer (Adam
    under megatron's mixed precision), and the engine's weights and share of the GPU."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    trainer_gpus = gpus - gpus // gpus_per_node * cfg.rollout.engine_gpus
    dp = trainer_gpus // (tp * pp)
    multiple = cfg.model.make_vocab_size_divisible_by * tp  # megatron pads the vocabulary to a multiple
    vocab = -(-arch.vocab_size // multiple) * multiple
    sharded, norms, _ = hf_params(arch)
    # column-parallel QKV (with its bias) and gate/up, row-parallel o/down: split over TP; norms replicated;
    # the vocab-parallel embedding on the first stage, the output layer and final norm on the last
    n = arch.num_layers // pp * (sharded / tp + norms) + vocab * arch.hidden_size / tp
    if pp == 1:
        n += (0 if arch.tie_word_embeddings else vocab * arch.hidden_size / tp) + arch.hidden_size
    bf16 = cfg.model.params_dtype == "bfloat16"
    adam = 4 + 4 + (4 if bf16 else 0)  # fp32 exp_avg, exp_avg_sq, and the fp32 master copy of bf16 weights
    return {"weights": n * (2 if bf16 else 4),
            "grads": n * 4,  # megatron's DDP accumulates and reduces main_grad in fp32
            "optimizer": n * adam / (dp if cfg.parallel.distributed_optimizer else 1),
            "engine_weights": hf_total_params(arch) * 2 / cfg.rollout.tensor_parallel_size,  # vLLM, bf16
            "engine_reserve": cfg.rollout.gpu_memory_utilization * 80 * plan.GiB}  # vLLM's share of an H100


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("method", list(METHODS))
def test_recipe_validates_and_fits_as_documented(recipe, method):
    preset, gpus, gib = RECIPES[recipe]
    cfg = compose(recipe, [f"method={method}"])
    assert (cfg.algo.advantage, cfg.algo.loss_agg) == METHODS[method] and cfg.verifier.lam > 0
    arch = plan.PRESETS[preset]
    validate(cfg, arch)
    p = plan.estimate(cfg, arch, plan.DEVICES["h100-80gb"], gpus)
    plan.check(p)  # raises when it cannot fit
    # the planner's dominant terms agree with the arithmetic above, made from the model's shape
    assert hf_total_params(arch) == pytest.approx(PUBLISHED_PARAMS[preset], rel=2e-3)
    ref = reference_memory(cfg, arch, gpus)
    for term in ("weights", "grads", "optimizer", "engine_weights"):
        assert p.memory[term] == pytest.approx(ref[term], rel=TERMS_REL), term
    assert p.memory["engine_weights"] + p.memory["engine_kv"] == pytest.approx(ref["engine_reserve"])
    # the documented figure from the reference terms, with only activations and logits (a few GiB) the
    # planner's own, combined as the run lays memory out (see plan.py)
    static = ref["weights"] + ref["grads"] + ref["optimizer"]
    training = static + p.memory["activations"] + p.memory["logits"]
    if cfg.rollout.engine_gpus:  # engines on GPUs of their own: the fuller kind of GPU
        documented = max(training, ref["engine_reserve"])
    elif cfg.rollout.mode == "sync" and cfg.rollout.enable_sleep_mode:  # training, or generation beside weights
        kept = ref["weights"] if cfg.train.offload_during_rollout else static
        documented = max(training, kept + ref["engine_reserve"])
    else:  # overlap, colocated: both resident at once
        documented = training + ref["engine_reserve"]
    assert documented / plan.GiB == pytest.approx(gib, abs=0.05)
    assert p.total / plan.GiB == pytest.approx(gib, abs=0.05)  # and it is what `rlv plan` prints
    header = (ROOT / "rlv_megatron" / "conf" / f"{recipe}.yaml").read_text()
    assert f"{gib:.1f} GiB of 80 per GPU" in header
    if recipe.endswith("_overlap"):  # the overlapped variant: engine and trainer resident at once
        assert cfg.rollout.mode == "overlap" and not cfg.rollout.enable_sleep_mode
        assert p.total == pytest.approx(sum(p.memory.values()))
    if recipe.endswith("_disagg"):  # engines on GPUs of their own: the fuller of the two kinds of GPU
        assert cfg.rollout.mode == "overlap" and cfg.rollout.engine_gpus == 4
        engine = p.memory["engine_weights"] + p.memory["engine_kv"]
        trainer = sum(p.memory.values()) - engine
        assert p.total == pytest.approx(max(engine, trainer))
        assert f"{trainer / plan.GiB:.1f}" in header and f"{engine / plan.GiB:.1f}" in header
    assert cfg.algo.max_tokens < cfg.rollout.max_model_len
    assert len(load_math(cfg.task.eval_path)) == 500  # the datasets resolve (from the project's cache)
    assert len(load_math(cfg.task.train_path, skip_invalid=True)) == 7498


def test_data_and_model_locations_come_from_the_environment(monkeypatch, tmp_path):
    from rlv_megatron.assets import cache_dir, dataset_path

    monkeypatch.setenv("RLV_MODEL_DIR", "/m/qwen")
    cfg = compose("math_7b", ["parallel.tp=4"])
    assert cfg.model.path == "/m/qwen" and cfg.parallel.tp == 4
    assert (cfg.task.train_path, cfg.task.eval_path) == ("math/train", "math500/test")
    assert dataset_path(cfg.task.train_path) == cache_dir() / "data" / "math" / "train.jsonl"
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "train.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    monkeypatch.setenv("RLV_DATA_DIR", str(tmp_path))  # the names resolve under a user's own folder
    assert dataset_path("math/train") == tmp_path / "math" / "train.jsonl"


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_cfg_job_resolve_prints_the_resolved_config(recipe):
    app = recipe.removesuffix("_overlap").removesuffix("_disagg")
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / f"{app}.py"), "--cfg", "job", "--resolve",
                          *(["--config-name", recipe] if recipe != app else []),
                          "method=loo_ppo_v", "train.steps=7"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "advantage: rloo" in out.stdout and "steps: 7" in out.stdout
    assert ("mode: overlap" in out.stdout) == (recipe != app)
    assert re.search(r"train_path: math/train\b", out.stdout)
    assert "${" not in out.stdout  # interpolations resolved


def test_plain_python_on_a_multi_gpu_node_relaunches_under_torchrun():
    from rlv_megatron.hydra_app import self_launch_command

    argv = ["recipes/math_7b.py", "method=loo_ppo_v"]
    cmd = self_launch_command({}, 8, argv, "/py")
    assert cmd == ["/py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8", *argv]
    assert self_launch_command({"RANK": "0", "WORLD_SIZE": "8"}, 8, argv, "/py") is None  # under torchrun
    assert self_launch_command({"SLURM_PROCID": "3"}, 8, argv, "/py") is None  # an srun task
    assert self_launch_command({}, 1, argv, "/py") is None and self_launch_command({}, 0, argv, "/py") is None
    # disaggregated: one rank per trainer GPU, the engines take the rest
    assert self_launch_command({}, 8, argv, "/py", engine_gpus=4)[4] == "--nproc-per-node=4"
    with pytest.raises(ConfigError, match="rollout.engine_gpus=8: this machine has 8 GPUs"):
        self_launch_command({}, 8, argv, "/py", engine_gpus=8)
