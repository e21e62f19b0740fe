"""Where training figures go: a progress bar, `metrics.jsonl` in the output dir, and W&B.

Only rank 0 logs. The jsonl log is the local record a batch job leaves behind; on resume
it is cut back to the checkpoint's step, so every step appears once. W&B runs offline
when `WANDB_MODE=offline` (nothing here needs the network). The W&B run id is chosen and
written to `out/wandb_run.json` before the W&B run starts, so every rerun of the same training
(--resume, or a run killed before its first checkpoint started again) continues that W&B run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from kukla.atomic import write_atomic
from kukla.errors import KuklaError
from kukla.progress import progress

METRICS_FILE = "metrics.jsonl"
WANDB_RUN_FILE = "wandb_run.json"
logger = logging.getLogger(__name__)


class TrainLog:
    """Progress bar, jsonl metrics and (optionally) W&B for one training run."""

    def __init__(self, out: Path, total_tokens: int, *, start_tokens: int, start_step: int,
                 enabled: bool, wandb_run: Any = None) -> None:
        self.enabled = enabled
        self.path = Path(out) / METRICS_FILE
        self.wandb_run = wandb_run
        self.bar = progress(total_tokens, "train", initial=start_tokens, disable=not enabled)
        self._last_time = time.perf_counter()
        self._last_tokens = start_tokens
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_after(self.path, start_step)

    def advance(self, tokens: int) -> None:
        """Move the bar by the tokens of one step (global, over all ranks)."""
        self.bar.update(tokens)

    def record(self, step: int, tokens: int, per_member: dict[str, dict[str, float]]) -> None:
        """Write one line per sweep member and show the first member's figures on the bar."""
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_tokens = now, tokens
        with self.path.open("a") as f:
            for name, metrics in per_member.items():
                f.write(json.dumps({"step": step, "tokens": tokens, "dictionary": name,
                                    "tokens_per_s": rate, **metrics}) + "\n")
        first = next(iter(per_member.values()))
        self.bar.set_postfix({key: f"{first[key]:.4g}" for key in ("loss", "fvu", "l0", "dead_pct")
                              if key in first}, refresh=False)
        if self.wandb_run is not None:
            flat = {f"{name}/{key}": value for name, m in per_member.items() for key, value in m.items()}
            self.wandb_run.log({**flat, "tokens": tokens, "tokens_per_s": rate}, step=step)

    def summary(self, name: str, values: dict[str, Any]) -> None:
        """End-of-run figures (e.g. the calibrated inference L0) for one member."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"dictionary": name, "final": True, **values}) + "\n")
        if values.get("inference_l0") is not None:  # a calibrated BatchTopK
            logger.info("%s: calibrated inference L0 %.3f", name, values["inference_l0"])
        if self.wandb_run is not None:
            self.wandb_run.summary.update({f"{name}/{k}": v for k, v in values.items()})

    def close(self) -> None:
        self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(out: Path, project: str, name: str | None, run: dict[str, Any], checkpointed_id: str | None,
                config: dict[str, Any]) -> Any:
    """The W&B run of the training run in `out`, its files under `out/wandb`. `run`: the settings and
    store that make the training what it is; `checkpointed_id`: the id a checkpoint of an older kukla
    recorded (its out dir has no `wandb_run.json`)."""
    try:
        import wandb
    except ImportError:
        raise KuklaError("--wandb needs the wandb package: pip install wandb") from None
    run_id = wandb_run_id(out, run, checkpointed_id)
    try:
        return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(out), config=config)
    except Exception as exc:  # wandb raises many types; the user needs one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KuklaError(f"W&B could not start ({first_line}); log in, or set WANDB_MODE=offline") from None


def wandb_run_id(out: Path, run: dict[str, Any], checkpointed_id: str | None) -> str:
    """The id kept in `out/wandb_run.json` for this same training `run`, else `checkpointed_id` or a
    new one, written there (atomically) before W&B starts: an id W&B chose would be lost with a run
    killed before its first checkpoint. A rerun with other settings (say, after an out-of-memory
    crash at step 0) is another training, so it gets a W&B run of its own, never the old one's steps."""
    path = Path(out) / WANDB_RUN_FILE
    settings = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or torn: a new id
        kept = {}
    if isinstance(kept, dict) and kept.get("settings") == settings and kept.get("id"):
        return str(kept["id"])
    run_id = checkpointed_id or secrets.token_hex(6)  # W&B ids: letters and digits, unique in a project
    write_atomic(path, json.dumps({"id": run_id, "settings": settings}).encode())
    return run_id


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step` by a run that was killed before its next checkpoint, and a
    line torn by a full disk or a power cut mid-append (unreadable, and the last one written); the rewrite is
    atomic, so a kill during it keeps the old log."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", -1) <= step and not record.get("final"):
            kept.append(line + "\n")
    write_atomic(path, "".join(kept).encode())
