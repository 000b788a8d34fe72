# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Atomic training checkpoints and exact resume, on top of accelerate's `save_state` / `load_state`.

A checkpoint is written to `checkpoint-N.tmp` and renamed to `checkpoint-N` only when every process has
finished writing: a kill during the write leaves a `.tmp` folder that `latest_checkpoint` ignores (and the
next save removes), never a `checkpoint-N` that looks complete and is not. The rename is `os.replace`, atomic
on POSIX file systems.

Resume restores the model, optimizer, scheduler, registered objects (EMA) and RNG states (accelerate), and
the global step / epoch from the folder name; `resume_dataloader` skips the batches of the resumed epoch that
were already seen (accelerate's `skip_first_batches`).

API (stable; `train_probe.py` imports it):
    CHECKPOINT_PREFIX = "checkpoint"
    list_checkpoints(output_dir) -> [(step, path)] complete checkpoints, oldest first
    latest_checkpoint(output_dir) -> path | None
    save_checkpoint(accelerator, output_dir, step, total_limit=None) -> path   (call on EVERY process)
    prune_checkpoints(output_dir, total_limit) -> [removed paths]
    resolve_resume_path(resume_from_checkpoint, output_dir) -> path | None
    resume_from_checkpoint(accelerator, resume_from_checkpoint, output_dir, num_update_steps_per_epoch)
        -> ResumeState(global_step, first_epoch, skip_batches_in_epoch, path)
    resume_dataloader(accelerator, dataloader, epoch, state, gradient_accumulation_steps) -> dataloader
"""

import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import List, Optional, Tuple

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"
TMP_SUFFIX = ".tmp"
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints `(step, path)` in `output_dir`, oldest first (`.tmp` folders are ignored)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint folder, or `None`."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: str, total_limit: Optional[int]) -> List[str]:
    """Remove the oldest checkpoints so that at most `total_limit` remain. Returns the removed paths."""
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    removed = []
    for _, path in found[: max(len(found) - total_limit, 0)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info(f"Removed {len(removed)} old checkpoint(s) (limit {total_limit}): {', '.join(map(os.path.basename, removed))}")
    return removed


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: Optional[int] = None) -> str:
    """
    Save the training state to `output_dir/checkpoint-{step}` atomically; then keep at most `total_limit`.

    Call it on every process (accelerate writes each process's RNG state; DeepSpeed needs all ranks).
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}-{step}")
    tmp = final + TMP_SUFFIX
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):  # the same step saved again (e.g. after a resume): replace it
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(output_dir)
        prune_checkpoints(output_dir, total_limit)
        logger.info(f"Saved state to {final}")
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve_resume_path(resume_from_checkpoint: Optional[str], output_dir: str) -> Optional[str]:
    """`'latest'` -> the newest checkpoint or `None`; a name -> `output_dir/name`; a path -> itself. Raises if missing."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, os.path.basename(resume_from_checkpoint))
    if not os.path.isdir(path) or path.endswith(TMP_SUFFIX):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r}: no such complete checkpoint (found: "
            f"{[os.path.basename(p) for _, p in list_checkpoints(output_dir)] or 'none'}). Pass 'latest' or a checkpoint folder."
        )
    return path


@dataclass
class ResumeState:
    global_step: int = 0
    first_epoch: int = 0
    skip_batches_in_epoch: int = 0  # optimisation steps of `first_epoch` already done
    path: Optional[str] = None


def checkpoint_step(path: str) -> int:
    match = _NAME.match(os.path.basename(os.path.normpath(path)))
    if not match:
        raise ValueError(f"{path!r} is not a '{CHECKPOINT_PREFIX}-N' folder.")
    return int(match.group(1))


def resume_from_checkpoint(accelerator, resume_from_checkpoint: Optional[str], output_dir: str,
                           num_update_steps_per_epoch: Optional[int]) -> ResumeState:
    """Load the state of a checkpoint (`'latest'`, a name or a path) into the prepared objects; `ResumeState()` if none."""
    path = resolve_resume_path(resume_from_checkpoint, output_dir)
    if path is None:
        if resume_from_checkpoint:
            accelerator.print(f"No checkpoint in {output_dir!r} to resume from: starting a new training run.")
        return ResumeState()
    step = checkpoint_step(path)
    accelerator.print(f"Resuming from checkpoint {path} (step {step})")
    accelerator.load_state(path)
    if num_update_steps_per_epoch:
        return ResumeState(step, step // num_update_steps_per_epoch, step % num_update_steps_per_epoch, path)
    return ResumeState(step, 0, step, path)  # streamed data: one endless epoch


def resume_dataloader(accelerator, dataloader, epoch: int, state: ResumeState, gradient_accumulation_steps: int = 1):
    """
    The loader for `epoch`, without the batches the resumed run already consumed in it. Call it at the start of
    every epoch: it sets the epoch of the dataset (`data.TrainDataset` shuffles per epoch) and of accelerate's
    loader, whose `__iter__` re-sets the dataset's epoch from its own counter, which restarts at 0 after a resume.
    """
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)  # sets the dataset's too
    elif hasattr(getattr(dataloader, "dataset", None), "set_epoch"):
        dataloader.dataset.set_epoch(epoch)
    if state.path is not None and epoch == state.first_epoch and state.skip_batches_in_epoch > 0:
        dataloader = accelerator.skip_first_batches(dataloader, state.skip_batches_in_epoch * gradient_accumulation_steps)
    return dataloader
