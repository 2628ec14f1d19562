"""The run folder and its checkpoints: ``<run>/checkpoints/step_000100/``.

A checkpoint is ``accelerator.save_state`` (model weights as safetensors, the optimizer and
every process's RNG state, all read back with ``weights_only=True``), plus the loop's
``train_state.json`` and the resolved ``config.yaml``, written last as the completeness
marker. Nothing in it is unpickled on ``--resume``: the train state is plain JSON, and no
object is registered with accelerate (its custom objects are read with pickle).

A checkpoint is written into a hidden temporary folder, fsynced, and renamed into place only
when complete: a crash or a full disk mid-save leaves the previous checkpoints as they were
and no half-written ``step_N``. Every run folder holds ``run.json`` with the run's id; each
checkpoint records it, and pruning only ever removes this run's own checkpoints.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAIN_STATE = "train_state.json"
MARKER = "config.yaml"  # written last: a checkpoint folder without it is not complete
RUN_FILE = "run.json"


class TrainState:
    """The loop's counters, saved with each checkpoint as JSON.

    The running loss sum of the open log window is part of it, so a run stopped between two
    log records and resumed writes the same next record as one that never stopped. Every
    process's sum is gathered into the state before a save (``gather_loss_sums``) and each
    process takes its own back on load.
    """

    def __init__(self, device: torch.device | str = "cpu", rank: int = 0, run_id: str = ""):
        self.step = 0  # steps taken (skipped ones included: their batches are consumed)
        self.tokens = 0  # training tokens consumed, all processes together
        # This process's loss summed over the steps since the last log record (kept on the
        # device so the loop never waits for it), and how many steps that is.
        self.loss_sum = torch.zeros((), device=device)
        self.loss_steps = 0
        self.skipped_steps = 0  # steps whose loss or gradients were not finite, in all
        self.consecutive_skips = 0
        self.run_id = run_id
        self.rank = rank
        self._all_loss_sums: list[float] = []

    def gather_loss_sums(self, accelerator) -> None:
        """Collect every process's ``loss_sum`` (a collective: call it on all processes)."""
        self._all_loss_sums = accelerator.gather(self.loss_sum.reshape(1)).cpu().tolist()

    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "step": self.step, "tokens": self.tokens,
                "loss_steps": self.loss_steps, "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips,
                "loss_sums": self._all_loss_sums or [self.loss_sum.item()]}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = str(state["run_id"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.loss_steps = int(state["loss_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skips = int(state["consecutive_skips"])
        sums = [float(v) for v in state["loss_sums"]]
        # Resumed on another number of processes (a different run from here on anyway: the
        # batches depend on the rank), the mean keeps the next record's value about right.
        self.loss_sum.fill_(sums[self.rank] if self.rank < len(sums) and len(sums) > 1
                            else sum(sums) / len(sums))


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written or read; the message names the path."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def read_train_state(path: Path) -> dict:
    """A checkpoint's train_state.json, as a dict (CheckpointError naming the file if bad)."""
    file = path / TRAIN_STATE
    try:
        state = json.loads(file.read_text())
        int(state["step"]), str(state["run_id"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file}: not a readable train state ({type(err).__name__}: {err})") from None


def list_checkpoints(run_dir: Path, run_id: str | None = None) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (of run ``run_id`` when given), oldest first."""
    root = run_dir / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if not (m and (p / MARKER).is_file()):
                continue
            if run_id is not None:
                try:
                    if read_train_state(p)["run_id"] != run_id:
                        continue
                except CheckpointError:
                    continue
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path, run_id: str | None = None) -> Path:
    found = list_checkpoints(run_dir, run_id)
    if not found:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
    return found[-1][1]


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the folders themselves (the rename that follows
    must not land before the bytes do)."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _why(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return "the disk is full"
    return f"{type(err).__name__}: {err}"


def save_checkpoint(accelerator, state: TrainState, run_dir: Path, step: int, config_yaml: str,
                    keep: int) -> Path:
    """Save on every process (sharded states need all ranks) into a temporary folder, then on
    the main process: the train state, the marker, fsync, rename into place, prune this run's
    older checkpoints. A failed save removes its temporary folder and raises CheckpointError
    naming the path and the cause; the checkpoints already there are untouched."""
    path = checkpoint_dir(run_dir, step)
    tmp = path.parent / f".{path.name}.tmp-{state.run_id}"
    state.gather_loss_sums(accelerator)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a save that was killed
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAIN_STATE).write_text(json.dumps(state.state_dict(), indent=1) + "\n")
            (tmp / MARKER).write_text(config_yaml)
            _fsync_tree(tmp)
            if path.exists():  # this run saved this step before (a resumed, re-run stretch)
                stale = path.parent / f".{path.name}.replaced-{uuid.uuid4().hex[:8]}"
                path.rename(stale)
                shutil.rmtree(stale)
            tmp.rename(path)
            _fsync_dir(path.parent)
    except Exception as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint {path} was not saved ({_why(err)}); the earlier "
                              "checkpoints are as they were") from err
    if accelerator.is_main_process and keep:
        for _, old in list_checkpoints(run_dir, state.run_id)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator, state: TrainState, path: Path) -> None:
    """Restore a checkpoint saved by ``save_checkpoint`` (CheckpointError naming it if bad)."""
    saved = read_train_state(path)
    strangers = sorted(p.name for p in path.glob("custom_checkpoint_*"))
    if strangers:  # accelerate would unpickle these; save_checkpoint never writes them
        raise CheckpointError(f"--resume: checkpoint {path} holds {', '.join(strangers)}, which "
                              "fp8train never writes; it is not loaded (a pickle can run code): "
                              "remove it to resume")
    try:
        accelerator.load_state(str(path))
    except Exception as err:
        raise CheckpointError(f"--resume: checkpoint {path} could not be read ({_why(err)}); "
                              "remove it to resume from the one before") from err
    state.load_state_dict(saved)


# ------------------------------------------------------------------------------ run folder
def run_summary(run_dir: Path) -> str | None:
    """What the folder holds, in a few words, or None if it holds no run."""
    if not run_dir.is_dir():
        return None
    found = list_checkpoints(run_dir)
    names = {p.name for p in run_dir.iterdir()}
    if not found and not names & {"config.yaml", "metrics.jsonl", "summary.json", RUN_FILE}:
        return None
    if found:
        return f"checkpoints up to step {found[-1][0]}"
    return "a run with no complete checkpoint"


def read_run_id(run_dir: Path) -> str | None:
    file = run_dir / RUN_FILE
    if not file.is_file():
        return None
    try:
        return str(json.loads(file.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start_run_folder(run_dir: Path) -> str:
    """Create ``run_dir`` with a new run id in run.json; returns the id."""
    run_id = uuid.uuid4().hex
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    tmp.replace(run_dir / RUN_FILE)
    return run_id


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<run_dir>.replaced-<timestamp>`` (never deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    run_dir.rename(target)
    return target
