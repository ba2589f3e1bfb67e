"""Engine deaths survived (rollout.max_restarts): a call whose engine process died (killed, OOM) starts a fresh
engine from the run's start-up weights, loads the trainer's current weights into it (`reload`) and repeats the
call. Engine calls are functions of (weights, prompts, seeds), so the repeat returns what the first try would
have, and a run with a restart repeats the run without one.

A weight update cut short is not repeated: the restart's reload is the same update (the current weights).
"""

from __future__ import annotations

import sys
from typing import Callable


class EngineDied(RuntimeError):
    """The engine died more than rollout.max_restarts times in a row. The trainer adds where it stands
    (`note`) before the run ends with one line."""

    exit_code = 75  # EX_TEMPFAIL: the same command, started again, resumes

    def __init__(self, message: str, call: str):
        super().__init__(message)
        self.call, self.note, self.stopping = call, "", False
        self.boundary, self.placed = None, False  # the RL step whose start the policy is at (train/loop.py)

    def __str__(self) -> str:
        return super().__str__() + self.note


def engine_died(error: BaseException, engine) -> bool:
    """Whether `error` is the engine's death (vLLM's EngineDeadError, or anything once vLLM saw it die)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(error, EngineDeadError):
        return True
    dead = getattr(engine, "dead", None)
    return bool(dead and dead())


class RestartingEngine:
    """An engine that is replaced when it dies. `start()` makes an engine; `reload(engine)` puts the current
    weights into a fresh one and returns its SyncStats (None: the start-up weights are the current ones, as in
    `rlv eval`); `max_restarts`: consecutive failures of one call survived (0: the first death ends it)."""

    def __init__(self, start: Callable[[], object], max_restarts: int, reload: Callable | None = None,
                 stopping: Callable[[], bool] = lambda: False):
        self._start, self.max_restarts, self.reload, self.stopping = start, max_restarts, reload, stopping
        self.engine = start()
        self.restarts = 0  # over the run: a metric

    def __getattr__(self, name):  # what needs no restart: the config, sleep, dead, close
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    def generate(self, *args, **kwargs):
        return self._call("generate", args, kwargs)

    def score_yes(self, *args, **kwargs):
        return self._call("score_yes", args, kwargs)

    def prompt_logprobs(self, *args, **kwargs):
        return self._call("prompt_logprobs", args, kwargs)

    def wake_up(self):
        return self._call("wake_up", (), {})  # a fresh engine is awake: the repeat does nothing

    def sleep(self):
        return self._call("sleep", (), {})

    def update_weights(self, named_tensors):
        return self._call("update_weights", (named_tensors,), {}, repeat=False)

    def _call(self, name: str, args: tuple, kwargs: dict, repeat: bool = True):
        attempt = 0
        while True:
            try:
                if attempt:
                    reloaded = self._restart(name, error, attempt)
                    if not repeat:
                        return reloaded
                return getattr(self.engine, name)(*args, **kwargs)
            except Exception as e:  # noqa: BLE001: anything else is re-raised at once
                if not (isinstance(e, RestartFailed) or engine_died(e, self.engine)):
                    raise
                error = e
            if self.stopping():  # the run is being stopped (SIGTERM, which may have reached the engine too)
                died = EngineDied(f"the rollout engine died during {name} while the run stops", name)
                died.stopping = True
                raise died from error
            attempt += 1
            if attempt > self.max_restarts:
                raise EngineDied(f"the rollout engine died {attempt} time(s) in a row during {name} (rollout."
                                 f"max_restarts={self.max_restarts}): {type(error).__name__}: {error}", name) from error

    def _restart(self, name: str, error, attempt: int):
        print(f"rlv: the rollout engine died during {name} ({type(error).__name__}); restart {attempt} of "
              f"rollout.max_restarts={self.max_restarts}: a new engine with the current weights repeats it",
              file=sys.stderr, flush=True)
        try:
            self.engine.close()
        except Exception:  # noqa: BLE001: a dead engine's shutdown may fail; its processes are gone
            pass
        try:
            self.engine = self._start()
        except Exception as e:  # noqa: BLE001: a start that fails counts as one more death
            raise RestartFailed(f"a new engine did not start: {e}") from e
        self.restarts += 1
        return None if self.reload is None else self.reload(self.engine)

    def close(self) -> None:
        self.engine.close()


class RestartFailed(RuntimeError):
    """A replacement engine failed to start (counted as one more consecutive failure)."""
