"""Checkpoints in the run folder: ``<run>/checkpoints/step_000100/`` from ``accelerator.save_state``.

``save_state`` writes the model and optimizer (model weights as safetensors), the RNG states
of every process and every object registered with ``accelerator.register_for_checkpointing``;
here that is ``TrainState``, which carries the step. The resolved config is written beside
them, so a checkpoint says what produced it.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")


class TrainState:
    """The loop's counters, saved and restored with the checkpoint.

    The running loss sum of the open log window is part of it, so a run stopped between two
    log records and resumed writes the same next record as one that never stopped. accelerate
    saves registered objects from the main process only, so every process's sum is gathered
    into the state first (``gather_loss_sums``) and each process takes its own back on load.
    """

    def __init__(self, device: torch.device | str = "cpu", rank: int = 0):
        self.step = 0  # optimizer steps completed
        self.tokens = 0  # training tokens consumed, all processes together
        # This process's loss summed over the steps since the last log record (kept on the
        # device so the loop never waits for it), and how many steps that is.
        self.loss_sum = torch.zeros((), device=device)
        self.loss_steps = 0
        self.rank = rank
        self._all_loss_sums: list[float] = []

    def gather_loss_sums(self, accelerator) -> None:
        """Collect every process's ``loss_sum`` (a collective: call it on all processes)."""
        self._all_loss_sums = accelerator.gather(self.loss_sum.reshape(1)).cpu().tolist()

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "loss_steps": self.loss_steps,
                "loss_sums": self._all_loss_sums or [self.loss_sum.item()]}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.loss_steps = int(state["loss_steps"])
        sums = state["loss_sums"]
        # Resumed on another number of processes (a different run from here on anyway: the
        # batches depend on the rank), the mean keeps the next record's value about right.
        self.loss_sum.fill_(sums[self.rank] if self.rank < len(sums) and len(sums) > 1
                            else sum(sums) / len(sums))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = run_dir / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            # config.yaml is written last, so a folder without it is a save that was cut off.
            if m and (p / "config.yaml").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir / 'checkpoints'}")
    return found[-1][1]


def save_checkpoint(accelerator, state: TrainState, run_dir: Path, step: int, config_yaml: str,
                    keep: int) -> Path:
    """Save on every process (sharded states need all ranks), then prune old ones on rank 0."""
    path = checkpoint_dir(run_dir, step)
    state.gather_loss_sums(accelerator)
    accelerator.save_state(str(path), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / "config.yaml").write_text(config_yaml)
        if keep:
            for _, old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path
