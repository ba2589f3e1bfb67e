"""Preemption without warning (SIGTERM from Slurm or a container runtime): the run finishes its RL step,
checkpoints and exits 0; the same command resumes it. A step boundary not reached within
train.sigterm_grace_s ends the run at once (status 143), and the last checkpoint resumes it. Outside the RL
steps (warm start, start-up, final evaluation) there is no step to finish: SIGTERM ends the run at once.
Either way the run's `finally` blocks close the engine and the grader workers."""

from __future__ import annotations

import signal
import sys
import threading


class Preempted(Exception):
    """SIGTERM handled at a step boundary: the checkpoint is written."""

    exit_code = 0


class PreemptedMidStep(Exception):
    """SIGTERM outside the RL steps, or no step boundary within the grace period."""

    exit_code = 128 + signal.SIGTERM


class SigtermWatch:
    """Installed in the main thread around a run; `due()` at each step boundary says whether to stop there
    (agreed over all ranks: a signal can reach them at different steps)."""

    def __init__(self, grace_s: float):
        self.grace_s, self.requested, self.in_steps = grace_s, False, False
        self._saved = None

    def __enter__(self) -> SigtermWatch:
        if threading.current_thread() is threading.main_thread():
            self._saved = (signal.signal(signal.SIGTERM, self._on_term), signal.getsignal(signal.SIGALRM))
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGTERM, self._saved[0])
            signal.signal(signal.SIGALRM, self._saved[1])

    def _on_term(self, signum, frame) -> None:
        if not self.in_steps:
            raise PreemptedMidStep("SIGTERM outside the RL steps: stopped at once; the same command resumes from "
                                   "the last checkpoint, if any")
        if self.requested:
            return
        self.requested = True
        print(f"rlv: SIGTERM: checkpointing after this RL step (train.sigterm_grace_s={self.grace_s:g})",
              file=sys.stderr, flush=True)
        signal.signal(signal.SIGALRM, self._too_late)
        signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def _too_late(self, signum, frame) -> None:
        raise PreemptedMidStep(f"SIGTERM: no RL step boundary within train.sigterm_grace_s={self.grace_s:g}: "
                               "stopped mid-step; the same command resumes from the last checkpoint")

    def due(self) -> bool:
        """Collective under torch.distributed: whether any rank got SIGTERM."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop_steps(self) -> None:
        """The RL steps are over (the final evaluation follows): a later SIGTERM stops at once."""
        self.in_steps = False
        signal.setitimer(signal.ITIMER_REAL, 0)
