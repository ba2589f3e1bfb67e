"""Step logging: TensorBoard scalars (with the dashboards' layout and GPU samples), phase timers and a JSON
line per step. What the numbers mean is computed elsewhere (scaling.py: verifier quality; dashboards.py:
throughput)."""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict


class Metrics:
    def __init__(self, logdir: str | None, jsonl: str | None = None):
        """TensorBoard scalars under `logdir` (with the custom-scalars layout, a "gpu" text note and gpu/*
        samples where NVML sees a GPU); also one JSON line per log call appended to `jsonl`."""
        self.jsonl = jsonl
        self.writer = None
        self.gpu, self.gpu_note = None, None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            from rlv_megatron import dashboards

            self.writer = SummaryWriter(logdir)
            self.writer.add_custom_scalars(dashboards.layout())
            self.gpu, self.gpu_note = dashboards.open_gpu_monitor()
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
