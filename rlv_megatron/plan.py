"""`rlv plan`: per-GPU memory and token throughput of a run before it is launched.

Memory per GPU (bytes), for the pipeline stage that holds the most (the first: embedding + the 1F1B
schedule's in-flight micro-batches):
  weights      P * param_bytes                               P = parameters on this rank (TP/PP shard)
  grads        P * 4                                         megatron DDP reduces grads in fp32
  optimizer    P * (8 + 4 [fp32 master copy if bf16]) / (DP if distributed optimizer)     Adam m, v
  activations  per token and layer (elements): 10h + 4f [+ heads * row when attention probabilities are
               stored], / TP for the sharded ones, x bytes; selective recompute drops the scores, full
               recompute keeps only the layer input (h) plus one layer being recomputed; backward adds
               about two layers' worth of gradients (measured);
               x micro-batch tokens x layers per stage x in-flight micro-batches (min(PP, count))
  logits       train.logprob_impl=fused (default): two fp32 chunks of train.logprob_chunk_mb at most and the
               fp32 output-weight gradient vocab/TP x h x 4; =logits: micro-batch tokens x vocab/TP x
               (param_bytes + 2 x 4), the output, its fp32 copy and the softmax kept for backward
  engine       vLLM takes rollout.gpu_memory_utilization of the GPU: its weights (bf16 / rollout TP), the
               rest KV cache (2 x layers x kv_heads x head_dim x 2 bytes per token / rollout TP), which sets
               how many of the replica's sequences decode at once at full length; with sleep mode (sync) the
               engine's memory is freed while training runs, and the peak is the larger of two phases (`phases`):
               training (every term above) and generation (what stays of the trainer's beside the awake engine's
               share: the weights, and with train.offload_during_rollout=false the grads and optimizer too, which
               train/offload.py otherwise moves to host memory; activations and logits are returned to the
               driver by torch.cuda.empty_cache() first); without sleep mode the sum (always the sum under
               rollout.mode=overlap: the engine generates while the trainer trains); with rollout.engine_gpus
               the engines have GPUs of their own (the last of each node), so training and the engine are on
               different GPUs and the total is the fuller of the two
Throughput: training at `mfu` of peak bf16 FLOPs with 6 x params FLOPs per token (8 with full recompute);
decoding limited by memory bandwidth (each step reads the weights and the KV cache once).
Validated against measured peak memory of small configs on CPU (tests/test_plan.py); the GPU figures
are estimates from these formulas, not measurements.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field, replace

from rlv_megatron.config import Config, ConfigError
from rlv_megatron.models.builder import padded_vocab_size, shares_prompts
from rlv_megatron.models.hf_config import ModelArch

GiB = 1 << 30


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense
    bandwidth_tbps: float
    flash_attention: bool = True  # attention scores are not stored (TE / flash)
    spec: str = "te"  # the layers model.impl=auto builds there
    host: bool = False  # this machine's CPU: trainer and engine processes share its memory_gib (no GPU)
    # train.micro_batch_tokens=auto picks no larger budget (CPU: measured slower and superlinear in memory above)
    auto_max_tokens: int = 32768


DEVICES = {
    "h100-80gb": Device("H100 80GB SXM", 80, 989, 3.35),
    "h200": Device("H200 141GB", 141, 989, 4.8),
    "a100-80gb": Device("A100 80GB", 80, 312, 2.0),
    "cpu": Device("CPU (local spec)", 0, 0, 0, flash_attention=False, spec="local", auto_max_tokens=2048),
}
# SmolLM2-135M, lambda = 1, one CPU train step (benchmarks/train_memory.py, 2026-12-08): 1024 / 2048 / 4096-token
# budgets took 52.2 / 44.9 / 59.6 s and peaked 5.25 / 7.19 / 13.78 GiB, the plan reading x0.85 / x0.86 / x0.68
AUTO_MARGIN = 0.2  # train.micro_batch_tokens=auto: the plan may fill this much less than the memory there
# a CPU engine process beside its weights and KV cache, and the trainer before its model: interpreters, torch,
# vLLM (SmolLM2-135M: trainer 0.47 GiB before the model, engine 3.3 GB with 0.54 GB of weights and 1 GiB of KV)
HOST_RUNTIME_GIB = 2.2
VERIFY_TURN_TOKENS = 64  # the question and the Yes/No answer after a response, through a chat template

# Architectures of the cluster recipes, from their config.json (no download at run time).
PRESETS = {
    "qwen2.5-math-7b": ModelArch(family="qwen2", vocab_size=152064, hidden_size=3584, ffn_hidden_size=18944,
                                 num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, norm_eps=1e-6,
                                 rope_theta=10000.0, max_position_embeddings=4096, qkv_bias=True,
                                 tie_word_embeddings=False),
    "r1-distill-qwen-32b": ModelArch(family="qwen2", vocab_size=152064, hidden_size=5120, ffn_hidden_size=27648,
                                     num_layers=64, num_heads=40, num_kv_heads=8, head_dim=128, norm_eps=1e-5,
                                     rope_theta=1000000.0, max_position_embeddings=131072, qkv_bias=True,
                                     tie_word_embeddings=False),
}


@dataclass
class Plan:
    memory: dict[str, float] = field(default_factory=dict)  # bytes per GPU, by term
    micro_batch_tokens: int = 0  # the budget planned (train.micro_batch_tokens, or what auto chose)
    total: float = 0.0
    capacity: float = 0.0
    throughput: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # sleep mode: bytes per GPU in training, generation
    problems: list[str] = field(default_factory=list)  # reasons it cannot run besides the total
    where: str = "per GPU"  # what capacity is

    @property
    def fits(self) -> bool:
        return not self.problems and (self.capacity == 0 or self.total <= self.capacity)

    def biggest(self) -> str:
        return max(self.memory, key=self.memory.get)

    def table(self) -> str:
        lines = [f"{'term':<14}{'GiB':>10}"] + [f"{k:<14}{v / GiB:>10.2f}" for k, v in self.memory.items()]
        lines.append(f"{'total':<14}{self.total / GiB:>10.2f}" +
                     (f"   of {self.capacity / GiB:.0f} GiB" if self.capacity else ""))
        lines += [f"{k}: {v:,.0f}" for k, v in self.throughput.items()] + self.notes + self.problems
        return "\n".join(lines)


def layer_params(arch: ModelArch) -> int:
    h, d = arch.hidden_size, arch.head_dim
    attn = h * d * (arch.num_heads + 2 * arch.num_kv_heads) + arch.num_heads * d * h
    bias = (arch.num_heads + 2 * arch.num_kv_heads) * d if arch.qkv_bias else 0
    return attn + bias + 3 * h * arch.ffn_hidden_size + 2 * h


def total_params(arch: ModelArch) -> int:
    emb = arch.vocab_size * arch.hidden_size
    return arch.num_layers * layer_params(arch) + emb * (1 if arch.tie_word_embeddings else 2) + arch.hidden_size


def activation_elements(arch: ModelArch, tp: int, sp: bool, row: int, recompute: str, scores: bool) -> float:
    """Activation elements autograd keeps per token per layer: norm inputs, qkv input, Q/K/V with K, V
    repeated to every head, attention context, fc1 in/out, SiLU output, fc2 input, and the attention
    probabilities when the attention kernel stores them (saved-tensor hooks on the local spec counted
    12h + 4f + heads x row at h=512, f=1536)."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    if recompute == "full":
        return h / (tp if sp else 1)
    replicated = 2 * h  # the two norm inputs (sharded along the sequence under SP)
    sharded = 10 * h + 4 * f
    per = replicated / (tp if sp else 1) + sharded / tp
    if scores and recompute == "none":
        per += arch.num_heads * row / tp
    return per


def trainer_world(cfg: Config, world_size: int, gpus_per_node: int) -> int:
    """The GPUs that train: all of them, or with rollout.engine_gpus all but that many per node."""
    e = cfg.rollout.engine_gpus
    if not e:
        return world_size
    if world_size % gpus_per_node:
        raise ConfigError(f"rollout.engine_gpus={e}: {world_size} GPUs are not whole nodes of {gpus_per_node}")
    if e >= gpus_per_node:
        raise ConfigError(f"rollout.engine_gpus={e}: leaves no GPU of a {gpus_per_node}-GPU node to train")
    return world_size - world_size // gpus_per_node * e


def engines_per_node(cfg: Config, trainer_gpus: int, nodes: int) -> list[int]:
    """Engine owners on each node, for megatron's rank order (tp fastest, then dp, then pp): a replica's
    owner is TP rank 0 of stage 0, i.e. the ranks below TP x DP at multiples of TP; node n holds the trainer
    ranks n x trainer_gpus ... (n + 1) x trainer_gpus - 1."""
    tp, dp = cfg.parallel.tp, trainer_gpus * nodes // (cfg.parallel.tp * cfg.parallel.pp)
    owners = range(0, tp * dp, tp)
    return [sum(n * trainer_gpus <= r < (n + 1) * trainer_gpus for r in owners) for n in range(nodes)]


def estimate(cfg: Config, arch: ModelArch, device: Device, world_size: int, **options) -> Plan:
    """The plan of `cfg` on `world_size` of `device`; train.micro_batch_tokens=auto: of the largest power-of-two
    budget, from the first above rollout.max_model_len (a whole sequence with its verification turn) up to
    device.auto_max_tokens, whose total fits the device's memory less AUTO_MARGIN (the smallest if none does)."""
    if cfg.train.micro_batch_tokens != "auto":
        return _estimate(cfg, arch, device, world_size, **options)
    budget = 1 << cfg.rollout.max_model_len.bit_length()
    while True:
        plan = _estimate(with_budget(cfg, budget), arch, device, world_size, **options)
        if 2 * budget > device.auto_max_tokens or not device.memory_gib:
            break
        bigger = _estimate(with_budget(cfg, 2 * budget), arch, device, world_size, **options)
        if not bigger.fits or bigger.total > (1 - AUTO_MARGIN) * bigger.capacity:
            break
        budget, plan = 2 * budget, bigger
    plan.notes.append(f"train.micro_batch_tokens=auto: {budget}, the largest budget up to {device.auto_max_tokens} "
                      f"whose plan fills at most {1 - AUTO_MARGIN:.0%} of the {device.memory_gib:.1f} GiB"
                      if device.memory_gib else f"train.micro_batch_tokens=auto: {budget} ({device.name}: no "
                      "memory to fit; a run measures the host's)")
    return plan


def step_tokens(cfg: Config) -> int:
    """An upper bound on the tokens of one step's batch: its sequences (an RL step's samples; an SFT step's
    traces, correct and corrupted) at rollout.max_model_len each, plus room for the verification turn."""
    sequences = max(cfg.algo.prompts_per_step * cfg.algo.group_size,
                    2 * cfg.sft.batch_size if cfg.sft.steps else 0)
    return sequences * (cfg.rollout.max_model_len + VERIFY_TURN_TOKENS)


def with_budget(cfg: Config, tokens: int) -> Config:
    out = copy.deepcopy(cfg)
    out.train.micro_batch_tokens = tokens
    return out


def _estimate(cfg: Config, arch: ModelArch, device: Device, world_size: int, mfu: float = 0.4,
              bandwidth_efficiency: float = 0.7, gpus_per_node: int = 8) -> Plan:
    par, tr = cfg.parallel, cfg.train
    tp, pp = par.tp, par.pp
    train_world = trainer_world(cfg, world_size, gpus_per_node)
    if train_world % (tp * pp):
        raise ConfigError(f"parallel.tp={tp} x parallel.pp={pp} does not divide the {train_world} GPUs that train")
    dp = train_world // (tp * pp)
    pbytes = 2 if cfg.model.params_dtype == "bfloat16" else 4
    vpad = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    layers_per_stage = arch.num_layers // pp
    first_stage = layers_per_stage * layer_params(arch) / tp + vpad * arch.hidden_size / tp
    if pp == 1:
        first_stage += (0 if arch.tie_word_embeddings else vpad * arch.hidden_size / tp) + arch.hidden_size
    P = first_stage
    plan = Plan(micro_batch_tokens=tr.micro_batch_tokens)
    m = plan.memory
    m["weights"] = P * pbytes
    m["grads"] = P * 4
    m["optimizer"] = P * (8 + (4 if pbytes == 2 else 0)) / (dp if par.distributed_optimizer else 1)
    T = min(tr.micro_batch_tokens, step_tokens(cfg))  # a micro-batch holds no more than a step's batch
    # scores kept for the backward only by megatron's DotProductAttention (TE and SDPA keep a logsumexp)
    scores = not device.flash_attention and cfg.model.local_attention == "dot_product"
    # the longest span attention covers: one sequence (THD packed or one per row), a shared prompt's unit (up
    # to the budget), or a whole packed micro-batch under the dense mask DotProductAttention needs
    longest = min(T, cfg.rollout.max_model_len)
    share = shares_prompts(tr, device.spec if cfg.model.impl == "auto" else cfg.model.impl)
    row = (T if scores else longest) if tr.pack else T if share else longest
    if tr.share_prompts and not share:
        plan.notes.append("train.share_prompts: off under TransformerEngine (THD has no form for a shared prompt)")
    per_token = activation_elements(arch, tp, par.sequence_parallel, row, par.recompute, scores=scores)
    in_flight = pp  # 1F1B: the first stage holds up to PP micro-batches' activations
    one_layer = activation_elements(arch, tp, par.sequence_parallel, row, "none", scores) * \
        pbytes * T
    # backward also holds the gradients of the layer it is in (measured: about two layers' worth), and full
    # recompute re-creates one layer's activations at a time
    act = per_token * pbytes * T * layers_per_stage * in_flight + one_layer * (1 if par.recompute == "full" else 2)
    m["activations"] = act
    if pp == 1:
        full = T * vpad / tp
        m["logits"] = min(2 * tr.logprob_chunk_mb * 2**20, 2 * full * 4) + vpad / tp * arch.hidden_size * 4 \
            if tr.logprob_impl == "fused" else full * (pbytes + 2 * 4)
    else:
        plan.notes.append("logits live on the last stage; the first stage (shown) holds the embedding")
    train_total = sum(m.values())
    if device.host:  # the engine process runs beside the trainer's, in the same memory, all the time
        ro = cfg.rollout
        plan.capacity, plan.where = device.memory_gib * GiB, f"on {device.name}"
        m["engine_weights"] = total_params(arch) * (4 if ro.dtype == "float32" else 2)
        m["engine_kv"] = ro.cpu_kv_cache_gib * GiB
        m["runtimes"] = HOST_RUNTIME_GIB * GiB
        plan.total = sum(m.values())
    elif device.memory_gib:
        ro = cfg.rollout
        rtp = ro.tensor_parallel_size
        plan.capacity = device.memory_gib * GiB
        reserve = ro.gpu_memory_utilization * plan.capacity  # what vLLM takes: weights, then KV cache
        engine_weights = total_params(arch) * 2 / rtp
        kv_budget = max(reserve - engine_weights, 0.0)
        m["engine_weights"], m["engine_kv"] = engine_weights, kv_budget
        # overlap: the engine generates while the trainer trains, both resident (validate refuses sleep mode)
        asleep_in_training = ro.enable_sleep_mode and ro.mode == "sync"
        if ro.engine_gpus:  # the engines' GPUs and the trainer's are different GPUs: the fuller one counts
            plan.total = max(train_total, reserve)
            plan.notes.append(f"rollout.engine_gpus={ro.engine_gpus}: trainer GPUs hold {train_total / GiB:.1f} "
                              f"GiB (weights ... logits), engine GPUs {reserve / GiB:.1f} GiB (engine_weights, "
                              f"engine_kv); {train_world} of the {world_size} GPUs train")
            trainer_gpn = gpus_per_node - ro.engine_gpus
            per_node = engines_per_node(cfg, trainer_gpn, world_size // gpus_per_node)
            if max(per_node) * rtp > ro.engine_gpus:
                plan.problems.append(f"rollout.engine_gpus={ro.engine_gpus}: a node holds the first ranks of "
                                     f"{max(per_node)} data-parallel replicas, whose engines need "
                                     f"{max(per_node) * rtp} GPUs at rollout.tensor_parallel_size={rtp}")
            idle = sum(ro.engine_gpus - k * rtp for k in per_node)
            if idle and not plan.problems:
                plan.notes.append(f"{idle} engine GPU(s) idle: engines run on their replica's first node")
        elif asleep_in_training:  # two phases; the engine's start is like the generation phase
            offloaded = tr.offload_during_rollout  # train/offload.py: grads and optimizer off while it is awake
            kept = m["weights"] + (0.0 if offloaded else m["grads"] + m["optimizer"])
            plan.phases = {"training": train_total, "generation": kept + reserve}
            plan.total = max(plan.phases.values())
            plan.notes.append(f"sleep mode: training {train_total / GiB:.1f} GiB (the engine asleep), generation "
                              f"{(kept + reserve) / GiB:.1f} GiB (the engine's {reserve / GiB:.1f} beside the "
                              + ("weights; grads and optimizer in host memory: train.offload_during_rollout)"
                                 if offloaded else "weights, grads and optimizer: train.offload_during_rollout"
                                 "=false)"))
        else:
            plan.total = train_total + reserve
        if kv_budget == 0:
            plan.problems.append(f"rollout.gpu_memory_utilization={ro.gpu_memory_utilization}: the engine's "
                                 f"{reserve / GiB:.1f} GiB do not hold its {engine_weights / GiB:.1f} GiB of weights")
        seqs = cfg.algo.prompts_per_step * cfg.algo.group_size / dp  # one engine per data-parallel replica
        kv_seq = ro.max_model_len * 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 2 / rtp
        in_flight = max(min(seqs, kv_budget // kv_seq), 1)
        if in_flight < seqs:
            plan.notes.append(f"KV cache holds {in_flight:.0f} of the {seqs:.0f} sequences per engine at "
                              f"rollout.max_model_len={ro.max_model_len}: rollouts run in waves")
        if ro.mode == "overlap" and not ro.engine_gpus:
            plan.notes.append(f"rollout.mode=overlap: engine and trainer share each GPU at once (no sleep mode); "
                              f"generation runs beside training, up to {ro.max_staleness} update(s) behind; the "
                              f"tokens/s figures assume each has the GPU to itself (contention not modelled)")
        if ro.max_step_tokens:
            plan.notes.append(f"partial rollouts: a generation round gives a sample at most {ro.max_step_tokens} "
                              f"tokens; {ro.partial_spare_groups} spare groups in progress beyond a step's")
        flops_token = (8 if par.recompute == "full" else 6) * total_params(arch)
        plan.throughput["train tokens/s (cluster)"] = mfu * device.bf16_tflops * 1e12 * train_world / flops_token
        if share:
            plan.notes.append(f"train.share_prompts: train tokens/s counts tokens computed; a prompt computed once for "
                              f"its {cfg.algo.group_size} samples makes sequence tokens/s higher by "
                              f"(prompt + response) / (prompt / {cfg.algo.group_size} + response)")
        # a decode step reads the weights and, on average, half of each sequence's final KV cache
        step_s = (engine_weights + in_flight * kv_seq / 2) / (device.bandwidth_tbps * 1e12 * bandwidth_efficiency)
        plan.throughput["rollout tokens/s (cluster)"] = in_flight / step_s * dp
        if rtp != tp * pp and not ro.engine_gpus:
            plan.notes.append(f"rollout.tensor_parallel_size={rtp}: each replica's engine uses {rtp} of its "
                              f"{tp * pp} GPUs (set it to TP x PP to use them all)")
    else:
        plan.total = train_total
    return plan


def check(plan: Plan) -> None:
    """Refuse a plan that does not fit, naming the biggest term."""
    reasons = list(plan.problems)
    if plan.capacity and plan.total > plan.capacity:
        big = plan.biggest()
        reasons.insert(0, f"does not fit: {plan.total / GiB:.1f} GiB {plan.where} > {plan.capacity / GiB:.1f} GiB; "
                          f"the biggest term is {big} ({plan.memory[big] / GiB:.1f} GiB)"
                          + ("; lower train.micro_batch_tokens" if big in ("activations", "logits") else ""))
    if reasons:
        raise ConfigError("; ".join(reasons))


def this_machine(local_ranks: int = 1) -> Device:
    """The device this process trains on, as a plan device: on CPU the host's memory available now, shared
    evenly by its local ranks (each counted with an engine beside it); on GPU the GPU's whole memory (FLOP/s
    and bandwidth of the DEVICES entry whose name it shares, else the H100's)."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        like = next((d for d in DEVICES.values() if not d.host and d.spec == "te"
                     and d.name.split()[0] in props.name), DEVICES["h100-80gb"])
        return replace(like, name=props.name, memory_gib=props.total_memory / GiB)
    import psutil

    return replace(DEVICES["cpu"], name="this host (memory available now)", host=True,
                   memory_gib=psutil.virtual_memory().available / GiB / max(local_ranks, 1))


def settle(cfg: Config, arch: ModelArch, device: Device | None = None) -> Plan:
    """Before a run builds its model: train.micro_batch_tokens=auto resolved for this machine (said by global
    rank 0), and a config whose plan does not fit here refused, naming the biggest term."""
    ranks, local = int(os.environ.get("WORLD_SIZE", "1")), max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    device = device or this_machine(local)
    # the plan counts every GPU of the run; the ranks are the trainer's (rollout.engine_gpus per node are not)
    per_node = local + (0 if device.host else cfg.rollout.engine_gpus)
    auto = cfg.train.micro_batch_tokens == "auto"
    plan = estimate(cfg, arch, device, max(ranks // local, 1) * per_node, gpus_per_node=per_node)
    if auto:
        cfg.train.micro_batch_tokens = plan.micro_batch_tokens
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"rlv: train.micro_batch_tokens=auto: {plan.micro_batch_tokens} (rlv plan: {plan.total / GiB:.1f} "
                  f"of {plan.capacity / GiB:.1f} GiB {plan.where}, margin {AUTO_MARGIN:.0%}; the biggest term "
                  f"{plan.biggest()})", file=sys.stderr, flush=True)
    check(plan)
    return plan

