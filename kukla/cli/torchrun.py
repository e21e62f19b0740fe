"""`python -m kukla.cli.torchrun [torchrun flags] -m kukla train …`: torchrun, ending in one line.

Plain torchrun forwards a SIGTERM to its workers, waits for them (each kukla rank stops at the
same step and rank 0 writes a checkpoint) and then exits 1 with its own traceback. A batch
system reads that as a failure; this launcher exits 143 instead (128 + SIGTERM), as every other
kukla stage does when preempted. A rank that fails (a kukla error such as a resume under another
number of ranks, already said in one line by the rank) ends the launcher with that rank's exit
status and one line naming it, in place of torchrun's traceback and failure report. Everything
else is torchrun's own behaviour.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def launch() -> None:
    try:
        main()
    except SignalException as exc:
        print(f"stopped: torchrun got {exc.sigval.name}; its workers were stopped (kukla train writes a "
              "checkpoint first): rerun with --resume to continue", file=sys.stderr)
        sys.exit(128 + int(exc.sigval))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"error: rank {rank} {_ended(failure.exitcode)}, so torchrun stopped the other ranks; "
              "the rank's own error is above", file=sys.stderr)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode)


def _ended(exitcode: int) -> str:
    """How a worker ended: torchrun reports death by a signal as the negated signal number."""
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with status {exitcode}"


if __name__ == "__main__":
    launch()
