"""SigtermWatch in this process: SIGTERM inside the RL steps asks for a stop at the next boundary, past the
grace period (or outside the steps) it stops at once; the previous handlers come back afterwards."""

import os
import signal
import time

import pytest

from rlv_megatron.train.preempt import PreemptedMidStep, SigtermWatch


def test_sigterm_in_the_steps_is_due_at_the_boundary_then_too_late_past_the_grace():
    before = signal.getsignal(signal.SIGTERM)
    with SigtermWatch(grace_s=0.5) as watch:
        watch.in_steps = True
        assert not watch.due()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # delivered
        assert watch.due()
        os.kill(os.getpid(), signal.SIGTERM)  # a second one changes nothing
        with pytest.raises(PreemptedMidStep, match="sigterm_grace_s=0.5"):
            time.sleep(5)  # no step boundary within the grace
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_outside_the_steps_stops_at_once_and_a_boundary_in_time_cancels_the_alarm():
    with SigtermWatch(grace_s=60) as watch:
        with pytest.raises(PreemptedMidStep, match="outside the RL steps"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    with SigtermWatch(grace_s=0.3) as watch:
        watch.in_steps = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert watch.due()
        watch.stop_steps()  # the loop's way out: the alarm is off
        time.sleep(0.6)
    assert PreemptedMidStep.exit_code == 143
