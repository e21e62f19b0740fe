"""`python -m kukla.cli.torchrun [torchrun flags] -m kukla train …`: torchrun, stopped by SIGTERM in one line.

Plain torchrun forwards a SIGTERM to its workers, waits for them (each kukla rank stops at the
same step and rank 0 writes a checkpoint) and then exits 1 with its own traceback. A batch
system reads that as a failure; this launcher exits 143 instead (128 + SIGTERM), as every other
kukla stage does when preempted. Everything else is torchrun's own behaviour.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main


def launch() -> None:
    try:
        main()
    except SignalException as exc:
        print(f"stopped: torchrun got {exc.sigval.name}; its workers were stopped (kukla train writes a "
              "checkpoint first): rerun with --resume to continue", file=sys.stderr)
        sys.exit(128 + int(exc.sigval))


if __name__ == "__main__":
    launch()
