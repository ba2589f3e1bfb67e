"""A ready GPU check: the GPU-only paths of rlv-megatron against their CPU references, in at most ~8 minutes on
one H100. One line per check (`PASS name: detail`, `FAIL name: detail`, `SKIP name: reason`), then the summary
`gpu_check: N passed, M failed, K skipped` as the last line; the exit status is 1 when any check failed.

    environment          torch / triton / CUDA device, and which optional packages are present
    imports              every check's code path imports (megatron-core's only where it is installed)
    fixed_rollouts       the model (cached SmolLM2-135M-Instruct; else random weights of its architecture from
                         its config + tokenizer) and 16 fixed rollouts through the chat template -> one batch
    kernels_fused_logprob    kernels/verifier_loss.py's Triton path on CUDA against naive full-logits
                             log_softmax: fp32 and bf16, forward and backward
    kernels_grouped_advantage  kernels/grouped_advantage.py on CUDA against rlv_megatron.algos.advantages
    cuda_ipc_transport   a bucket packed in this process (rollout/transport.py CudaIpcBuffer), its handle through
                         msgpack, opened and unpacked in a spawned process (open_cuda_ipc): the same bytes
    train_bf16_vs_cpu_fp32   two RL^V steps (local spec, bf16, CUDA) on the fixed rollouts against the same
                             steps on the CPU (processes without CUDA, so models/cpu_compat.py applies): step 1
                             against fp32, step 2 against bf16 (see STEP2_TOL for why)
    checkpoint_resume_bf16   the bf16 run saved after step 1 (train/checkpoint.py), resumed in a new process:
                             weights bit-identical at load, step 2 equal to the uninterrupted run's
    memory_vs_plan       torch.cuda.max_memory_allocated of those steps / `rlv plan`'s trainer estimate
    te_fp8_step          TransformerEngine spec + FP8 (hybrid) step: where transformer_engine is installed
    vllm_sync_logprobs   vLLM engine, weight sync after a step, prompt log-probs against Megatron's: where vllm is

Each training run is its own process (`--job`): megatron's parallel state is per process, and the CPU
reference must start without CUDA. `--dry-run` (also RLV_GPU_CHECK_DRY_RUN=1) runs what needs no GPU and
reports the device checks as SKIP ("no CUDA device"); tests/test_gpu_check.py runs it on CPU.

On this project's GPU machine (torch 2.11 + CUDA 13, triton 3.6, transformers, Python 3.12; no vLLM,
megatron-core or TransformerEngine; no network; the working tree travels, .cache/ does not: the 517 MiB fp32
SmolLM2 is too big to carry, so the check trains random weights of SmolLM2-135M's architecture there):
    here, once:  bash scripts/gpu_check_wheels.sh      # .whl/: megatron-core 0.16.1 (cp312), and SmolLM2's
                                                        # config + tokenizer (no weights); about 6 MB
    there:       bash scripts/gpu_check.sh              # installs .whl/*.whl into /tmp/rlv-gpu-check-site
    (device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600))
Options: --only NAME[,NAME], --model DIR (a HF directory with weights), --budget-s (default 480).

The tolerances below are stated where they are used; they were set from CPU bf16-vs-fp32 runs and the
kernels' error analysis, not yet from a run on a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODEL = "smollm2-135m-instruct"
SKELETON = ROOT / ".whl" / MODEL  # config + tokenizer only (scripts/gpu_check_wheels.sh)


class Skip(Exception):
    """The check cannot run here; the message says why."""


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---- jobs: training runs in processes of their own ------------------------------------------------------

def train_config(p: dict):
    from rlv_megatron.config import Config

    cfg = Config()
    cfg.model.path = p["model_dir"]
    cfg.model.impl, cfg.model.params_dtype, cfg.model.fp8 = p.get("impl", "local"), p["dtype"], p.get("fp8")
    cfg.train.micro_batch_tokens = 1024  # 2-3 packed micro-batches of the fixed batch
    cfg.optim.lr = 1e-5
    return cfg


def weights_digest(policy) -> str:
    h = hashlib.sha256()
    for name, t in sorted(policy.model.state_dict().items()):
        if torch.is_tensor(t) and t.is_floating_point():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def job_train(p: dict) -> dict:
    """`steps` RL^V steps of the fixed batch; saves after step `save_after`, or starts from `resume`."""
    from rlv_megatron.train import checkpoint
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train.step import rl_objective

    cuda = torch.cuda.is_available()
    if p["device"] == "cpu" and cuda:
        raise RuntimeError("the CPU reference must run without CUDA (CUDA_VISIBLE_DEVICES='')")
    if cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)  # resume must repeat the run
    cfg = train_config(p)
    policy = Policy(cfg)
    batch, yes, no = torch.load(p["batch"], weights_only=False)
    out: dict = {"steps": {}, "params_dtype": str(next(policy.model.parameters()).dtype)}
    start = 0
    if p.get("resume"):
        start = checkpoint.load(policy, p["resume"])["step"]
        out["loaded_digest"] = weights_digest(policy)
        out["checkpoint_dtype"] = checkpoint.params_dtype(p["resume"])
    peak = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(start, p["steps"]):
        objective = rl_objective(batch, None, cfg.algo, cfg.verifier, policy.vocab, yes, no)
        out["steps"][step] = policy.train_step(batch, objective)
        if cuda:
            peak = max(peak, torch.cuda.max_memory_allocated())
        if p.get("save_after") == step + 1:
            out["saved_digest"] = weights_digest(policy)
            out["saved"] = str(checkpoint.save(policy, p["save_root"], step + 1, {"phase": "rl"}))
            if cuda:  # the save's own buffers are no training memory
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
    out["final_digest"] = weights_digest(policy)
    out["peak_bytes"] = peak
    return out


def job_vllm(p: dict) -> dict:
    """One step, a weight sync, then the engine's prompt log-probs of a fixed row against Megatron's."""
    from rlv_megatron.config import RolloutConfig
    from rlv_megatron.rollout.engine import VLLMEngine
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train.step import rl_objective, score

    cfg = train_config(p)
    policy = Policy(cfg)
    batch, yes, no = torch.load(p["batch"], weights_only=False)
    engine = VLLMEngine(p["model_dir"], RolloutConfig(dtype="bfloat16", max_model_len=512,
                                                      gpu_memory_utilization=0.3))
    try:
        policy.train_step(batch, rl_objective(batch, None, cfg.algo, cfg.verifier, policy.vocab, yes, no))
        synced = engine.update_weights(policy.hf_tensors()).tensors
        logp, _ = score(policy.chunks, batch, policy.vocab, 1.0, yes, None, cfg.train, policy.groups)
        n = int(batch.verify_pos[0]) + 1
        seq = batch.tokens[0, :n].tolist() + [int(batch.targets[0, n - 1])]
        got = torch.tensor(engine.prompt_logprobs([seq])[0])
    finally:
        engine.close()
    diff = (got - logp[0, :n]).abs()
    return {"synced": synced, "max": float(diff.max()), "mean": float(diff.mean()), "tokens": n}


JOBS = {"train": job_train, "vllm": job_vllm}


class Runner:
    def __init__(self, deadline: float, workdir: Path):
        self.deadline, self.workdir = deadline, workdir

    def job(self, name: str, payload: dict, cpu: bool = False) -> dict:
        out = self.workdir / f"job-{name}-{len(list(self.workdir.glob('job-*')))}.json"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        left = self.deadline - time.monotonic()
        if left < 20:
            raise Skip("time budget spent")
        done = subprocess.run([sys.executable, __file__, "--job", name, json.dumps(payload), str(out)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=left)
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
            raise RuntimeError(f"job {name} exited {done.returncode}: " + " | ".join(tail))
        return json.loads(out.read_text())


# ---- the checks -------------------------------------------------------------------------------------------

CHECKS: list = []


def check(fn):
    CHECKS.append(fn)
    return fn


def need_cuda(ctx) -> None:
    if not ctx["cuda"]:
        raise Skip("no CUDA device" + (" (--dry-run)" if ctx["dry_run"] and torch.cuda.is_available() else ""))


def need(module: str, label: str) -> None:
    if not has(module):
        raise Skip(f"{label} not installed")


def close(a: float, b: float, rel: float, abs_: float = 0.0) -> bool:
    return abs(a - b) <= abs_ + rel * abs(b)


@check
def environment(ctx) -> str:
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    present = [f"{m}={'yes' if has(m) else 'no'}" for m in ("megatron.core", "transformer_engine", "vllm")]
    return (f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"triton {triton.__version__}, {dev}; " + ", ".join(present))


@check
def imports(ctx) -> str:
    mods = ["kernels.verifier_loss", "kernels.grouped_advantage", "rlv_megatron.algos.advantages",
            "rlv_megatron.rollout.transport", "rlv_megatron.plan", "rlv_megatron.train.batch",
            "rlv_megatron.tasks.chat", "rlv_megatron.assets"]
    if has("megatron.core"):
        mods += ["rlv_megatron.train.policy", "rlv_megatron.train.step", "rlv_megatron.train.checkpoint",
                 "rlv_megatron.models.builder"]
    if has("vllm"):
        mods.append("rlv_megatron.rollout.engine")
    for m in mods:
        importlib.import_module(m)
    return f"{len(mods)} modules" + ("" if has("megatron.core") else " (megatron-core absent: train/* not imported)")


def resolve_model(ctx) -> tuple[str, str]:
    """(HF directory with weights, how it was found)."""
    from rlv_megatron import assets

    if ctx["args"].model:
        return ctx["args"].model, "--model"
    try:
        return str(assets.model_dir(MODEL)), "the cached pinned weights"
    except assets.AssetError:
        pass
    if not (SKELETON / "config.json").exists():
        raise AssertionError(f"no model: run `rlv fetch`, or scripts/gpu_check_wheels.sh for {SKELETON}")
    from transformers import AutoConfig, AutoModelForCausalLM

    out = ctx["workdir"] / "random-smollm2"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(SKELETON), dtype=torch.float32).save_pretrained(out)
    for f in SKELETON.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    return str(out), "random weights (seed 0) of its architecture: the pinned weights did not travel"


RESPONSE = ("Let me work through this step by step. First I write down what is given, then I combine the "
            "numbers carefully and check the result once more before answering. ")
QUESTIONS = ["What is 7 times 8?", "Natalia sold clips to 48 of her friends in April, and then she sold half as "
             "many clips in May. How many clips did Natalia sell altogether?", "What is 15 plus 27?",
             "A train travels 60 km in one hour. How far does it travel in 2.5 hours?"]


@check
def fixed_rollouts(ctx) -> str:
    """4 prompts x 4 fixed responses (some stopped, some truncated), fixed rewards and rollout log-probs."""
    from transformers import AutoTokenizer

    from rlv_megatron.algos.advantages import compute_advantages
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.train.batch import build_sequences

    model_dir, how = resolve_model(ctx)
    fmt = ChatFormat(AutoTokenizer.from_pretrained(model_dir))
    prompts, responses, rewards = [], [], []
    for i, q in enumerate(QUESTIONS):
        for j in range(4):
            ids = fmt.tokenizer.encode(RESPONSE * (1 + (i + j) % 3) + f"The answer is {10 * i + j}.",
                                       add_special_tokens=False)
            prompts.append(fmt.prompt_ids(q))
            responses.append(ids + [fmt.eos_id] if j % 3 else ids)  # every third one truncated
            rewards.append(float((i + j) % 2))
    groups = torch.arange(len(prompts)) // 4
    adv = compute_advantages("grpo", torch.tensor(rewards), groups, use_triton=False).tolist()
    logps = [[-0.5 - (t % 7) / 7 for t in range(len(r))] for r in responses]
    batch = build_sequences(fmt, prompts, responses, rewards, adv, [True] * len(prompts), fmt.eos_id,
                            rollout_logps=logps)
    path = ctx["workdir"] / "batch.pt"
    torch.save((batch, fmt.yes_id, fmt.no_id), path)
    ctx.update(model_dir=model_dir, batch_path=str(path), batch_tokens=int((batch.verify_pos + 1).sum()))
    return f"{MODEL}: {how}; {len(prompts)} sequences, {ctx['batch_tokens']} tokens"


@check
def kernels_fused_logprob(ctx) -> str:
    need_cuda(ctx)
    from kernels.verifier_loss import fused_logprobs, naive_logprobs

    g = torch.Generator(device="cuda").manual_seed(0)
    N, H, V, vocab = 1000, 576, 49280, 49152  # SmolLM2's hidden and (padded) vocabulary
    worst = {}
    # (dtype, logp/entropy atol, grad relative error): bf16 logits are rounded to 8 bits (|z| ~ 0.5: ~2e-3)
    for dtype, atol, grad_rel in ((torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-2, 3e-2)):
        h0 = torch.randn(N, H, device="cuda", generator=g).to(dtype)
        w0 = (torch.randn(V, H, device="cuda", generator=g) * 0.02).to(dtype)
        targets = torch.randint(0, vocab, (N, 3), device="cuda", generator=g)
        temp = 0.5 + torch.rand(N, device="cuda", generator=g)
        up = torch.randn(N, 3, device="cuda", generator=g)
        res = []
        for fn in (lambda h, w: fused_logprobs(h, w, targets, vocab, temp, chunk=96, use_triton=True),
                   lambda h, w: naive_logprobs(h.float(), w.float(), targets, vocab, temp)):
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            lp, ent = fn(h, w)
            dh, dw = torch.autograd.grad((lp * up).sum(), (h, w))
            res.append((lp.float(), ent.float(), dh.float(), dw.float()))
        (lp, ent, dh, dw), (lp_r, ent_r, dh_r, dw_r) = res
        errs = {"logp": (lp - lp_r).abs().max().item(), "entropy": (ent - ent_r).abs().max().item(),
                "dh": ((dh - dh_r).norm() / dh_r.norm()).item(), "dW": ((dw - dw_r).norm() / dw_r.norm()).item()}
        name = str(dtype).removeprefix("torch.")
        assert errs["logp"] <= atol and errs["entropy"] <= atol, f"{name} forward {errs} > atol {atol}"
        assert errs["dh"] <= grad_rel and errs["dW"] <= grad_rel, f"{name} backward {errs} > rel {grad_rel}"
        worst[name] = errs
    return "; ".join(f"{k}: " + ", ".join(f"{n} {e:.1e}" for n, e in v.items()) for k, v in worst.items()) + \
        " (fp32 atol 1e-4 / grad rel 1e-4; bf16 2e-2 / 3e-2; against full-logits log_softmax in fp32)"


@check
def kernels_grouped_advantage(ctx) -> str:
    need_cuda(ctx)
    from kernels.grouped_advantage import (ESTIMATORS, all_advantages_triton, token_advantages_reference,
                                           token_advantages_triton)
    from rlv_megatron.algos.advantages import compute_advantages

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 65, (200,), generator=g)  # groups of 1..64, some ids absent, shuffled
    ids = torch.repeat_interleave(torch.arange(200) * 2, sizes)[torch.randperm(int(sizes.sum()), generator=g)]
    rewards = torch.randint(0, 2, ids.shape, generator=g).float() * torch.rand(ids.shape, generator=g)
    got = all_advantages_triton(rewards.cuda(), ids.cuda()).cpu()
    err = max((got[k] - compute_advantages(n, rewards, ids, use_triton=False)).abs().max().item()
              for k, n in enumerate(ESTIMATORS))
    assert err <= 1e-5, f"estimators differ from the reference by {err:.2e} > 1e-5"
    mask = torch.rand(len(ids), 300, generator=g) > 0.3
    tok = token_advantages_triton(got[0].cuda(), mask.cuda()).cpu()
    assert torch.equal(tok, token_advantages_reference(got[0], mask)), "token broadcast differs"
    return f"{len(ids)} samples in 200 groups: {', '.join(ESTIMATORS)} max |diff| {err:.1e} (atol 1e-5); " \
           "token broadcast exact"


def _ipc_reader(handle_bytes, manifest, queue):
    import msgpack

    from rlv_megatron.rollout.transport import open_cuda_ipc, unpack

    buf = open_cuda_ipc(msgpack.unpackb(handle_bytes), torch.cuda.current_device())
    queue.put({name: hashlib.sha256(t.cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()).hexdigest()
               for name, t in unpack(buf, manifest)})


@check
def cuda_ipc_transport(ctx) -> str:
    need_cuda(ctx)
    import msgpack

    import torch.multiprocessing as mp

    from rlv_megatron.rollout.transport import CudaIpcBuffer, bucket_nbytes, pack

    g = torch.Generator(device="cuda").manual_seed(0)
    bucket = [(f"model.layers.0.w{i}", torch.randn(s, device="cuda", generator=g))
              for i, s in enumerate([(576, 192), (1536,), (3, 5, 7), (1,)])] + \
        [("model.embed_tokens.weight", torch.randn(4096, 576, device="cuda", generator=g))]
    buf = CudaIpcBuffer.allocate(bucket_nbytes(bucket, torch.bfloat16))
    manifest = pack(bucket, buf.tensor, torch.bfloat16)  # cast to the engine dtype while packing, as a sync does
    want = {n: hashlib.sha256(t.to(torch.bfloat16).cpu().flatten().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, t in bucket}
    handle = msgpack.packb(buf.handle())  # what crosses vLLM's RPC must be msgpack-safe
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    proc = spawn.Process(target=_ipc_reader, args=(handle, manifest, queue))
    proc.start()
    try:
        got = queue.get(timeout=120)
    finally:
        proc.join(30)
    buf.close()
    assert proc.exitcode == 0, f"reader exited {proc.exitcode}"
    bad = [n for n in want if got.get(n) != want[n]]
    assert not bad, f"bytes differ for {bad}"
    return f"{len(bucket)} tensors, {bucket_nbytes(bucket, torch.bfloat16)} bytes as bf16, sha256 equal in " \
        "the spawned reader"


# Step 1 (before any update): GPU bf16 against CPU fp32 - losses and entropy within 2%, the grad norm within 5%
# (on the CPU, bf16 against fp32 differed by at most 1.0%). Step 2 follows Adam's first update (lr 1e-5: about
# lr per weight), which bf16 model weights mostly round away (megatron keeps the fp32 master copy): on the CPU
# the fp32 run's step-2 loss fell 21% further than the bf16 run's. So step 2 is compared with the same two
# steps in bf16 on the CPU (the same mixed precision), within 5% (losses) and 10% (grad norm); the fp32 step-2
# gap is printed, not judged.
STEP1_TOL = {"loss/total": 0.02, "loss/policy": 0.02, "loss/verifier": 0.02, "policy/entropy": 0.02,
             "grad_norm": 0.05}
STEP2_TOL = {"loss/total": 0.05, "loss/policy": 0.05, "loss/verifier": 0.05, "policy/entropy": 0.05,
             "grad_norm": 0.10}


def compare(got: dict, ref: dict, tol: dict, what: str) -> float:
    """The worst difference as a fraction of its tolerance; fails naming the first one beyond it."""
    worst = 0.0
    for k, t in tol.items():
        a, b = got[k], ref[k]
        rel = abs(a - b) / max(abs(b), 1e-12)
        worst = max(worst, rel / t)
        assert close(a, b, t, 1e-6), f"{what} {k}: GPU bf16 {a:.6g} vs {b:.6g} (rel {rel:.1e} > {t})"
    return worst


@check
def train_bf16_vs_cpu_fp32(ctx) -> str:
    need("megatron.core", "megatron-core")
    need_cuda(ctx)
    assert "batch_path" in ctx, "fixed_rollouts did not run"
    base = {"model_dir": ctx["model_dir"], "batch": ctx["batch_path"], "steps": 2}
    ctx["gpu"] = gpu = ctx["runner"].job("train", {**base, "device": "cuda", "dtype": "bfloat16", "save_after": 1,
                                                   "save_root": str(ctx["workdir"] / "ckpt")})
    fp32 = ctx["runner"].job("train", {**base, "device": "cpu", "dtype": "float32"}, cpu=True)
    bf16 = ctx["runner"].job("train", {**base, "device": "cpu", "dtype": "bfloat16"}, cpu=True)
    assert gpu["params_dtype"] == "torch.bfloat16", gpu["params_dtype"]
    w1 = compare(gpu["steps"]["0"], fp32["steps"]["0"], STEP1_TOL, "step 1 vs CPU fp32:")
    w2 = compare(gpu["steps"]["1"], bf16["steps"]["1"], STEP2_TOL, "step 2 vs CPU bf16:")
    loss = lambda run, s: run["steps"][s]["loss/total"]  # noqa: E731
    return (f"step 1 loss {loss(gpu, '0'):.5f} vs CPU fp32 {loss(fp32, '0'):.5f} ({w1:.2f} of tolerance); step 2 "
            f"{loss(gpu, '1'):.5f} vs CPU bf16 {loss(bf16, '1'):.5f} ({w2:.2f} of tolerance; CPU fp32 "
            f"{loss(fp32, '1'):.5f}, not judged)")


@check
def checkpoint_resume_bf16(ctx) -> str:
    need("megatron.core", "megatron-core")
    need_cuda(ctx)
    gpu = ctx.get("gpu")
    assert gpu and "saved" in gpu, "train_bf16_vs_cpu_fp32 did not produce the run to resume"
    res = ctx["runner"].job("train", {"model_dir": ctx["model_dir"], "batch": ctx["batch_path"], "steps": 2,
                                      "device": "cuda", "dtype": "bfloat16", "resume": gpu["saved"]})
    assert res["checkpoint_dtype"] == "bfloat16", f"checkpoint saved {res['checkpoint_dtype']} weights"
    assert res["loaded_digest"] == gpu["saved_digest"], "weights after load differ from the saved ones"
    diffs = {k: abs(res["steps"]["1"][k] - v) / max(abs(v), 1e-12) for k, v in gpu["steps"]["1"].items()
             if isinstance(v, float)}
    worst = max(diffs, key=diffs.get)
    # equal is expected (deterministic algorithms asked for); a GPU reduction's order may still differ
    assert diffs[worst] <= 1e-3, f"resumed step 2 {worst} differs by rel {diffs[worst]:.1e} (> 1e-3)"
    same = res["final_digest"] == gpu["final_digest"]
    return (f"loaded weights bit-identical; step 2 stats " + ("equal" if diffs[worst] == 0 else
            f"within rel {diffs[worst]:.1e} ({worst})") + "; final weights " +
            ("bit-identical" if same else "not bit-identical (non-deterministic GPU kernels)"))


@check
def memory_vs_plan(ctx) -> str:
    from rlv_megatron import plan
    from rlv_megatron.models.hf_config import load_arch

    est = None
    if "model_dir" in ctx:
        cfg = train_config({"model_dir": ctx["model_dir"], "dtype": "bfloat16"})
        p = plan.estimate(cfg, load_arch(ctx["model_dir"]), plan.DEVICES["h100-80gb"], world_size=1)
        est = sum(v for k, v in p.memory.items() if not k.startswith("engine"))  # the trainer's terms
    note = f" (plan's trainer estimate {est / plan.GiB:.2f} GiB)" if est else ""
    try:
        need("megatron.core", "megatron-core")
        need_cuda(ctx)
    except Skip as e:
        raise Skip(str(e) + note) from None
    assert ctx.get("gpu"), "train_bf16_vs_cpu_fp32 did not measure"
    peak = ctx["gpu"]["peak_bytes"]
    ratio = peak / est
    # over 1.25x the plan would let an out-of-memory through; under 0.25x it says nothing
    assert 0.25 <= ratio <= 1.25, f"measured {peak / plan.GiB:.2f} GiB / estimate {est / plan.GiB:.2f} = {ratio:.2f}"
    return f"measured peak {peak / plan.GiB:.2f} GiB / plan {est / plan.GiB:.2f} GiB = {ratio:.2f} (pass: 0.25-1.25)"


@check
def te_fp8_step(ctx) -> str:
    need("megatron.core", "megatron-core")
    need("transformer_engine", "transformer_engine")
    need_cuda(ctx)
    te = ctx["runner"].job("train", {"model_dir": ctx["model_dir"], "batch": ctx["batch_path"], "steps": 1,
                                     "device": "cuda", "dtype": "bfloat16", "impl": "te", "fp8": "hybrid"})
    a = te["steps"]["0"]["loss/total"]
    ref = ctx["gpu"]["steps"]["0"]["loss/total"] if ctx.get("gpu") else None
    assert a == a and abs(a) < float("inf"), f"loss {a}"
    if ref is not None:  # FP8 GEMMs: a looser tolerance than bf16's
        assert close(a, ref, 0.05), f"TE FP8 loss {a:.5f} vs local bf16 {ref:.5f} (> 5%)"
    return f"TE spec + FP8 hybrid: loss {a:.5f}" + (f" vs local bf16 {ref:.5f} (5%)" if ref is not None else "")


@check
def vllm_sync_logprobs(ctx) -> str:
    need("megatron.core", "megatron-core")
    need("vllm", "vllm")
    need_cuda(ctx)
    r = ctx["runner"].job("vllm", {"model_dir": ctx["model_dir"], "batch": ctx["batch_path"], "device": "cuda",
                                   "dtype": "bfloat16"})
    # both sides bf16: per-token differences of a few 1e-2 are bf16 rounding, not a wrong sync
    assert r["max"] <= 0.1 and r["mean"] <= 0.02, f"engine vs Megatron log-probs: max {r['max']:.3f}, mean {r['mean']:.4f}"
    return f"{r['synced']} tensors synced; {r['tokens']} tokens: max |diff| {r['max']:.3f} (0.1), mean {r['mean']:.4f} (0.02)"


def injected_failure(ctx) -> str:
    raise AssertionError("deliberate failure (--inject-failure)")


# ---- the runner -------------------------------------------------------------------------------------------

def run(checks, ctx, out=print) -> int:
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for fn in checks:
        name = fn.__name__
        t0 = time.monotonic()
        try:
            if time.monotonic() > ctx["runner"].deadline:
                raise Skip("time budget spent")
            status, detail = "PASS", fn(ctx) + f" [{time.monotonic() - t0:.0f}s]"
        except Skip as e:
            status, detail = "SKIP", str(e)
        except AssertionError as e:
            status, detail = "FAIL", str(e) or "assertion failed"
        except Exception as e:  # noqa: BLE001: every check reports, none stops the others
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
            if os.environ.get("RLV_TRACEBACK"):
                traceback.print_exc()
        counts[status] += 1
        out(f"{status} {name}: {' '.join(detail.split())}")
    out(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("RLV_GPU_CHECK_DRY_RUN") == "1",
                    help="CPU only: the device checks report SKIP")
    ap.add_argument("--only", help="comma-separated check names")
    ap.add_argument("--model", help="a Hugging Face model directory (with weights) instead of the cached SmolLM2")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no check or job starts after this many seconds")
    ap.add_argument("--inject-failure", action="store_true", help="append a failing check (tests the report)")
    args = ap.parse_args(argv)
    checks = list(CHECKS)
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {f.__name__ for f in checks}
        if unknown:
            ap.error(f"unknown check(s) {sorted(unknown)}; known: {[f.__name__ for f in checks]}")
        checks = [f for f in checks if f.__name__ in names]
    if args.inject_failure:
        checks.append(injected_failure)
    with tempfile.TemporaryDirectory(prefix="rlv-gpu-check-") as tmp:
        ctx = {"args": args, "dry_run": args.dry_run, "cuda": torch.cuda.is_available() and not args.dry_run,
               "workdir": Path(tmp), "runner": Runner(time.monotonic() + args.budget_s, Path(tmp))}
        return run(checks, ctx, out=lambda line: print(line, flush=True))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--job":  # a training run in a process of its own
        _, _, job, payload, result = sys.argv
        Path(result).write_text(json.dumps(JOBS[job](json.loads(payload))))
        from rlv_megatron import dist

        dist.destroy()
        sys.exit(0)
    sys.exit(main())
