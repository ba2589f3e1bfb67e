"""RestartingEngine with a scripted engine: which failures restart it, what is repeated, when it gives up."""

import pytest
from vllm.v1.engine.exceptions import EngineDeadError

from rlv_megatron.rollout.restart import EngineDied, RestartingEngine


class Scripted:
    """Dies on the calls listed in `deaths` (shared by every engine of one test: a count of calls made)."""

    def __init__(self, log, deaths):
        self.log, self.deaths, self.closed = log, deaths, False

    def generate(self, prompts, seeds=None):
        self.log.append("generate")
        if len(self.log) in self.deaths:
            raise EngineDeadError()
        return [f"{p}:{s}" for p, s in zip(prompts, seeds)]

    def update_weights(self, tensors):
        self.log.append("update_weights")
        if len(self.log) in self.deaths:
            raise EngineDeadError()
        return sum(1 for _ in tensors)

    def close(self):
        self.closed = True


def _engine(deaths, max_restarts=3, stopping=lambda: False):
    log, starts = [], []

    def start():
        starts.append(Scripted(log, deaths))
        return starts[-1]

    return RestartingEngine(start, max_restarts, lambda e: ("reloaded", e.update_weights(iter([1, 2]))),
                            stopping), log, starts


def test_a_death_restarts_reloads_and_repeats_the_call():
    engine, log, starts = _engine(deaths={1})
    assert engine.generate(["a", "b"], seeds=[1, 2]) == ["a:1", "b:2"]
    assert log == ["generate", "update_weights", "generate"]  # died, new engine got the weights, repeated
    assert len(starts) == 2 and starts[0].closed and engine.restarts == 1


def test_a_weight_update_is_not_repeated_the_reload_is_that_update():
    engine, log, _ = _engine(deaths={1})
    assert engine.update_weights(iter([1, 2, 3])) == ("reloaded", 2)
    assert log == ["update_weights", "update_weights"]


def test_consecutive_deaths_past_max_restarts_end_in_engine_died():
    engine, log, starts = _engine(deaths={1, 2, 3}, max_restarts=1)  # the reload dies too
    with pytest.raises(EngineDied, match=r"died 2 time\(s\) in a row during generate \(rollout.max_restarts=1\)"):
        engine.generate(["a"], seeds=[0])
    engine, *_ = _engine(deaths={1}, max_restarts=0)
    with pytest.raises(EngineDied) as info:
        engine.generate(["a"], seeds=[0])
    assert info.value.call == "generate" and not info.value.stopping


def test_failures_are_counted_per_call_and_other_errors_are_not_deaths():
    engine, log, starts = _engine(deaths={1, 4}, max_restarts=1)
    engine.generate(["a"], seeds=[0])  # death 1, restart
    engine.generate(["a"], seeds=[0])  # death 2 is a new call's first: restarted again
    assert engine.restarts == 2
    with pytest.raises(TypeError):
        engine.generate(None, seeds=[0])  # a bug, not a death: raised as it is, no restart
    assert engine.restarts == 2


def test_no_restart_while_the_run_stops():
    engine, log, starts = _engine(deaths={1}, stopping=lambda: True)
    with pytest.raises(EngineDied) as info:
        engine.generate(["a"], seeds=[0])
    assert info.value.stopping and len(starts) == 1
