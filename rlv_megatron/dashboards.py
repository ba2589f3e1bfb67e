"""TensorBoard dashboards: the custom-scalars layout (throughput, RL^V quality), per-step throughput numbers,
and GPU utilisation / memory sampled through NVML (a "no GPU" note where NVML or a GPU is missing)."""

from __future__ import annotations

import os
import threading

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
