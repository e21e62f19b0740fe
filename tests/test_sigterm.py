"""SIGTERM stops harvest, finalize and import even when it lands where Python drops exceptions."""

from __future__ import annotations

import os
import signal

import pytest

from kukla.errors import Preempted, preemption_point, stop_on_sigterm


class _SendsSigtermWhenCollected:
    """Its `__del__` is where the handler runs: Python prints "Exception ignored" and goes on."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs on one of these bytecodes, still inside __del__
            pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped raise, as expected
def test_a_sigterm_dropped_inside_a_del_stops_the_loop_at_its_next_unit() -> None:
    units = []
    with pytest.raises(Preempted) as stopped:
        with stop_on_sigterm():
            for unit in range(5):
                preemption_point()
                units.append(unit)
                if unit == 1:
                    _SendsSigtermWhenCollected()  # collected at once
    assert units == [0, 1]
    assert stopped.traceback[-1].name == "preemption_point"  # the handler's own raise was dropped


def test_a_finished_block_leaves_no_stop_behind() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted):
        with stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):
                pass
    with stop_on_sigterm():
        preemption_point()  # a later block starts afresh
    assert signal.getsignal(signal.SIGTERM) is before
