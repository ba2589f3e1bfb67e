"""TensorBoard dashboards: the custom-scalars layout (throughput, RL^V quality), per-step throughput numbers,
GPU utilisation / memory sampled through NVML (a "no GPU" note where NVML or a GPU is missing), and the
step logger (`Metrics`: scalars, phase timers, a JSON line per step)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import defaultdict

ROLLOUT_TOKENS_PER_S = "throughput/rollout_tokens_per_s"  # generated tokens / rollout seconds (cluster)
TRAIN_TOKENS_PER_S = "throughput/train_tokens_per_s"  # tokens trained (x ppo epochs) / train seconds (cluster)
# peers' step rates, over the wall-clock step (rollout + reward + train + sync), cluster-wide: completion tokens
# (TRL's tokens/s) and prompt + completion tokens (verl's perf/throughput, there also / GPUs)
COMPLETION_TOKENS_PER_S = "throughput/completion_tokens_per_s"
TOKENS_PER_S = "throughput/tokens_per_s"
STEP_SECONDS = "time/step"
TFLOPS_PER_GPU = "throughput/tflops_per_gpu"  # achieved model FLOP/s of the train phase, per GPU
MFU = "throughput/mfu"  # TFLOPS_PER_GPU / the device's dense bf16 peak (only where the peak is known)
SYNC_GB_PER_S = "sync/gb_per_s"
GPU_UTIL = "gpu/util_percent"  # mean over the visible GPUs and the samples since the last log
GPU_MEMORY = "gpu/memory_used_gib"  # peak since the last log, of the fullest visible GPU

# SXM parts of plan.DEVICES, by the CUDA device name; PCIe / NVL variants have other peaks: no MFU for them
_GPU_NAMES = (("H200", "h200"), ("H100", "h100-80gb"), ("A100", "a100-80gb"))


def layout() -> dict:
    """The custom-scalars layout (SummaryWriter.add_custom_scalars); chart tags are regular expressions
    matched at the start of tag names."""
    def line(*tags):
        return ["Multiline", list(tags)]

    return {
        "throughput": {
            "tokens/s: rollout vs train": line(ROLLOUT_TOKENS_PER_S, TRAIN_TOKENS_PER_S),
            "tokens/s of the whole step": line(COMPLETION_TOKENS_PER_S, TOKENS_PER_S),
            "time per phase (s)": line(r"time/"),
            "MFU": line(MFU),
            "TFLOP/s per GPU": line(TFLOPS_PER_GPU),
            "weight sync (s)": line(r"sync/seconds"),
            "weight sync (GB/s)": line(SYNC_GB_PER_S),
            "GPU utilisation (%)": line(GPU_UTIL),
            "GPU memory used (GiB)": line(GPU_MEMORY),
        },
        "RL^V quality": {
            "reward (train) and pass@1 (eval)": line(r"reward/mean", r"eval/pass@1$"),
            "verifier AUC": line(r"verifier/auc_pooled", r"verifier/auc_within_prompt", r"eval/verifier_auc_"),
            "eval: weighted@k vs majority@k": line(r"eval/weighted@\d+$", r"eval/majority@\d+$"),
        },
    }


def model_flops(params: int, trained_tokens: float, scored_tokens: float) -> float:
    """Model FLOPs of a step's train phase: 6 x params per token computed by a training pass (forward +
    backward), 2 x params per token of a scoring forward (old log-probs, KL reference); padding, attention and
    recompute left out."""
    return params * (6 * trained_tokens + 2 * scored_tokens)


def peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak TFLOP/s from plan.DEVICES for a CUDA device name (None: CPU); None where unknown."""
    from rlv_megatron.plan import DEVICES

    if device_name is None:
        return DEVICES["cpu"].bf16_tflops or None
    if "PCIe" in device_name or "NVL" in device_name:
        return None
    return next((DEVICES[key].bf16_tflops for marker, key in _GPU_NAMES if marker in device_name), None)


def throughput(rollout_tokens: float, rollout_s: float, train_tokens: float, train_s: float, train_flops: float,
               gpus: int, peak: float | None, sync_gb: float, sync_s: float, step_s: float = 0.0,
               step_tokens: float = 0.0) -> dict:
    """A step's throughput scalars from cluster-wide token, FLOP and byte counts and phase seconds; a rate
    whose time is zero (a phase this rank does not run) is left out, MFU too where the peak is unknown.
    `step_s`: the wall-clock step; `step_tokens`: its prompt + completion tokens."""
    out = {}
    if step_s > 0:
        out[STEP_SECONDS] = step_s
        out[COMPLETION_TOKENS_PER_S] = rollout_tokens / step_s
        out[TOKENS_PER_S] = step_tokens / step_s
    if rollout_s > 0:
        out[ROLLOUT_TOKENS_PER_S] = rollout_tokens / rollout_s
    if train_s > 0:
        out[TRAIN_TOKENS_PER_S] = train_tokens / train_s
        out[TFLOPS_PER_GPU] = train_flops / train_s / gpus / 1e12
        if peak:
            out[MFU] = out[TFLOPS_PER_GPU] / peak
    if sync_s > 0 and sync_gb > 0:
        out[SYNC_GB_PER_S] = sync_gb / sync_s
    return out


def step_throughput(values: dict, times: dict, step_s: float, params: int, epochs: int, scoring_passes: int,
                    dp_size: int, gpus: int, peak: float | None) -> dict:
    """The throughput scalars of one RL step from its values (this replica's token counts, rl_step's
    throughput/* keys) and phase `times`: counts x replicas, FLOPs of the tokens computed."""
    trained = values["throughput/trained_tokens"] * dp_size
    scored = values["throughput/scored_tokens"] * dp_size * scoring_passes
    return throughput(
        rollout_tokens=values["throughput/generated_tokens"] * dp_size, rollout_s=times.get("rollout", 0.0),
        train_tokens=values["throughput/sequence_tokens"] * dp_size * epochs, train_s=times.get("train", 0.0),
        train_flops=model_flops(params, trained, scored), gpus=gpus, peak=peak, sync_gb=values["sync/gb"],
        sync_s=values["sync/seconds"], step_s=step_s, step_tokens=values["throughput/rollout_tokens"] * dp_size)


class GpuMonitor:
    """Samples utilisation and used memory of the given NVML devices in a daemon thread; read() returns
    the mean utilisation and peak memory since the previous read."""

    def __init__(self, nvml, handles: list, interval_s: float = 1.0):
        self.nvml, self.handles, self.interval_s = nvml, handles, interval_s
        self._lock = threading.Lock()
        self._util_sum, self._samples, self._peak_bytes = 0.0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        try:
            util = [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
            used = max(self.nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles)
        except self.nvml.NVMLError:
            return
        with self._lock:
            self._util_sum += sum(util) / len(util)
            self._samples += 1
            self._peak_bytes = max(self._peak_bytes, used)

    def read(self) -> dict:
        self._sample()
        with self._lock:
            if not self._samples:
                return {}
            out = {GPU_UTIL: self._util_sum / self._samples, GPU_MEMORY: self._peak_bytes / 2**30}
            self._util_sum, self._samples, self._peak_bytes = 0.0, 0, 0
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def open_gpu_monitor(interval_s: float = 1.0) -> tuple[GpuMonitor | None, str]:
    """A monitor of this process's visible GPUs (CUDA_VISIBLE_DEVICES: indices or UUIDs) and a note naming
    them, or (None, "no GPU (why)") where NVML or a GPU is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # ImportError, NVMLError_LibraryNotFound / DriverNotLoaded, ...
        return None, f"no GPU ({type(e).__name__}: {e})"
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = range(pynvml.nvmlDeviceGetCount()) if visible is None else \
            [v.strip() for v in visible.split(",") if v.strip()]
        handles = [pynvml.nvmlDeviceGetHandleByIndex(int(i)) if str(i).isdigit()
                   else pynvml.nvmlDeviceGetHandleByUUID(i) for i in ids]
        if not handles:
            raise RuntimeError("NVML lists no visible GPU")
        note = f"{len(handles)} x {pynvml.nvmlDeviceGetName(handles[0])}"
    except Exception as e:
        pynvml.nvmlShutdown()
        return None, f"no GPU ({type(e).__name__}: {e})"
    return GpuMonitor(pynvml, handles, interval_s), note


class Metrics:
    def __init__(self, logdir: str | None, jsonl: str | None = None):
        """TensorBoard scalars under `logdir` (with the custom-scalars layout, a "gpu" text note and gpu/*
        samples where NVML sees a GPU); also one JSON line per log call appended to `jsonl`."""
        self.jsonl = jsonl
        self.writer = None
        self.gpu, self.gpu_note = None, None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(logdir)
            self.writer.add_custom_scalars(layout())
            self.gpu, self.gpu_note = open_gpu_monitor()
            self.writer.add_text("gpu", self.gpu_note, 0)
        self.times: dict[str, float] = defaultdict(float)
        self.history: list[dict] = []

    @contextlib.contextmanager
    def timer(self, phase: str):
        """Add the block's seconds to `phase` (phases may nest: train contains score); also a torch.profiler
        range of that name, so a profile splits by phase."""
        from torch.profiler import record_function

        t0 = time.perf_counter()
        try:
            with record_function(phase):
                yield
        finally:
            self.times[phase] += time.perf_counter() - t0

    def histogram(self, tag: str, values: list, step: int) -> None:
        """A TensorBoard histogram (e.g. response/length); nothing without a log directory."""
        if self.writer is not None and values:
            import numpy as np

            self.writer.add_histogram(tag, np.asarray(values), step)
            self.writer.flush()

    def log(self, step: int, values: dict) -> dict:
        values = {**values, **{f"time/{k}": v for k, v in self.times.items()},
                  **(self.gpu.read() if self.gpu is not None else {})}
        self.times.clear()
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        self.history.append({"step": step, **values})
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        return values

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None
        if self.writer is not None:
            self.writer.close()
