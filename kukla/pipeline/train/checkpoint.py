"""Checkpoints that a kill can never leave half-written, and the dictionaries published from them.

Layout of a run's output directory:

    out/checkpoints/step-00001000/trainer_state.pt   optimisers, step, RNG states, stream cursors
    out/checkpoints/step-00001000/trainer_state.pt.sha256   its SHA-256, checked before a resume trusts it
    out/checkpoints/step-00001000/<member>/           SAELens-loadable dictionary dir per sweep member
    out/checkpoints/latest                            name of the newest complete checkpoint
    out/<member>/                                     the final dictionaries

A checkpoint is built in a hidden temporary directory, renamed into place (atomic on one
file system), and only then named by `latest` (itself replaced atomically). A kill at any
moment leaves `latest` pointing at a complete checkpoint, or at nothing yet.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from logging import getLogger
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from kukla.atomic import fsync_tree, write_atomic
from kukla.config import to_dict
from kukla.errors import KuklaError
from kukla.pipeline.dictionary.loss import snap_step
from kukla.pipeline.train.distributed import Ranks, barrier
from kukla.storage.location import Location, disk_full_error

if TYPE_CHECKING:
    from kukla.pipeline.train.config import TrainConfig
    from kukla.pipeline.train.log import TrainLog
    from kukla.pipeline.train.sweep import Trainee
    from kukla.storage import Store

logger = getLogger(__name__)

STATE_FILE = "trainer_state.pt"
_DIGEST = STATE_FILE + ".sha256"
_LATEST = "latest"


def checkpoints_dir(out: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(out) / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in `out`, or None."""
    pointer = checkpoints_dir(out) / _LATEST
    if not pointer.exists():
        return None
    path = checkpoints_dir(out) / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise KuklaError(f"{pointer} names {path.name}, which is incomplete; delete {pointer} to start over")
    return path


def publish_dir(build: Callable[[Path], None], final: Path) -> Path:
    """Build a directory in a temporary sibling, then rename it over `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        build(tmp)
        fsync_tree(tmp)
    except BaseException:  # a full disk, a kill by SIGTERM: leave no half-built folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # an earlier run reached the same step: replace it whole
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def write_checkpoint(out: Path, step: int, build: Callable[[Path], None], keep: int) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep`."""
    root = checkpoints_dir(out)
    try:
        path = publish_dir(build, root / f"step-{step:08d}")
        write_atomic(root / _LATEST, (path.name + "\n").encode())
    except OSError as exc:
        full = disk_full_error(exc, Location(out), f"writing checkpoint step-{step:08d}")
        raise (KuklaError(f"{full} with --resume") if full else exc) from None
    _prune(root, keep, path)
    return path


class _Writes:
    """A file whose write errors are kept (torch.save reports a full disk as a bare RuntimeError)
    and whose bytes are hashed as they go (a flipped byte in a pickle of tensors still loads)."""

    def __init__(self, file: Any, written: Callable[[int], Any] | None = None) -> None:
        self.file, self.error, self.sha256, self.written = file, None, hashlib.sha256(), written

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        try:
            n = self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise
        if self.written is not None:
            self.written(len(data))
        return n

    def flush(self) -> None:
        self.file.flush()


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in `obj` (nested in dicts, lists and tuples): near what saving it writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_state(path: Path, state: dict[str, Any], written: Callable[[int], Any] | None = None) -> None:
    """Write the trainer state (a plain torch pickle of tensors, ints and dicts) and its SHA-256;
    `written(n)` hears of each n bytes as they go (a progress bar's `update`)."""
    with open(Path(path) / STATE_FILE, "wb") as f:
        writes = _Writes(f, written)
        try:
            torch.save(state, writes)
        except RuntimeError:
            if writes.error is not None:
                raise writes.error from None
            raise
    (Path(path) / _DIGEST).write_text(writes.sha256.hexdigest() + "\n")


def load_state(checkpoint: Path) -> dict[str, Any]:
    """Read the trainer state written by `save_state` (our own file, so full unpickling), once
    its SHA-256 matches (checkpoints written before kukla recorded one are read unchecked)."""
    file, digest = Path(checkpoint) / STATE_FILE, Path(checkpoint) / _DIGEST
    if digest.exists():
        sha256 = hashlib.sha256()
        with open(file, "rb") as f:
            while block := f.read(16 << 20):
                sha256.update(block)
        if sha256.hexdigest() != digest.read_text().strip():
            raise KuklaError(f"{file} is damaged (checksum mismatch): delete {checkpoint} and write the name of an "
                             f"earlier step-* folder into {file.parent.parent / _LATEST}, "
                             "or train again without --resume")
    return torch.load(file, map_location="cpu", weights_only=False)


def _prune(root: Path, keep: int, newest: Path) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else steps:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a killed writer
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


L0_MISS = 1.5
"""A final batch L0 beyond this factor of target_l0 is reported as the target missed."""


def _token_policy(store: Store) -> dict[str, bool]:
    """SAELens' `prepend_bos` and `exclude_special_tokens` for a store harvested from text (every window
    starts with BOS; its special tokens are rows or not as the harvest chose): SAELens'
    `ActivationsStore.from_sae`, the way into `sae_lens.evals`, refuses a cfg without `prepend_bos`."""
    special = store.meta.get("special_tokens")
    if not isinstance(special, dict):  # toy or imported rows: no windows kukla packed
        return {}
    return {"prepend_bos": True, "exclude_special_tokens": bool(special.get("excluded"))}


def dictionary_metadata(config: TrainConfig, store: Store, trainee: Trainee, step: int, world: int,
                        calibrated: range) -> dict[str, Any]:
    """What save_dictionary records beside the weights (model, context and dataset also go to SAELens' cfg)."""
    summary = {k: float(v) for k, v in trainee.last.items()}
    model, dataset = store.meta.get("model"), store.meta.get("dataset")
    provenance = {
        "model_name": model.get("name") if isinstance(model, dict) else model,
        "context_size": store.context_size,
        "dataset_path": store.where.get("dataset", dataset.get("name")) if isinstance(dataset, dict) else None,
        **_token_policy(store),
    }
    return {
        **{key: value for key, value in provenance.items() if value is not None},
        "training": to_dict(config),
        "sweep_member": trainee.name,
        "seed": trainee.member.seed,
        "store": {"path": str(config.store), "fingerprint": store.meta.get("fingerprint"),
                  "identity": store.identity_digest},
        "hooks": {"input": config.hooks[0], "target": config.hooks[-1]},
        "step": step,
        "tokens": step * config.batch_size,
        "summary": summary,
        **({"calibration": {"rows": [calibrated.start, calibrated.stop], "store_fingerprint": store.fingerprint,
                            "per_latent_thresholds": config.per_latent_thresholds,
                            "l0_cap": int(trainee.dictionary.l0_cap)}}
           if trainee.dictionary.rule.calibrated else {}),
        "dead_window": {"tokens": trainee.member.config.dead_tokens,
                        "engaged": trainee.member.config.dead_tokens < config.tokens},
        "snap_step": snap_step(config.snap_fraction, config.total_steps(world)),
    }


def publish_final(final: Path | None, trainees: list[Trainee], out: Path, ranks: Ranks,
                  log: TrainLog) -> list[Path]:
    """Copy the final checkpoint's dictionaries to out/<member> (atomically) and report them."""
    paths = [out / t.name for t in trainees]
    if ranks.is_main and final is not None:
        for trainee, path in zip(trainees, paths):
            publish_dir(lambda tmp, src=final / trainee.name: shutil.copytree(src, tmp, dirs_exist_ok=True), path)
            inference_l0 = float(trainee.dictionary.inference_l0)  # NaN: no calibration (relu, jumprelu, topk)
            l0 = float(trainee.last["l0"]) if "l0" in trainee.last else None  # none: resumed at the end
            target = trainee.dictionary.cfg.target_l0
            log.summary(trainee.name, {"inference_l0": None if math.isnan(inference_l0) else inference_l0,
                                       "l0": l0, "path": str(path)})
            if target is not None and l0 is not None and not target / L0_MISS <= l0 <= target * L0_MISS:
                logger.warning("%s: L0 ended at %.3g, not near target_l0 %g: the penalty did not get it there in "
                               "this run; train longer or raise l0_control_rate (%g)", trainee.name, l0, target,
                               trainee.dictionary.cfg.l0_control_rate)
    barrier(ranks)
    return paths
