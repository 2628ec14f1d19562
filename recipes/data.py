"""Byte-level data: a corpus on disk, a fixed train/val split, batches chosen by a seed.

The default corpus needs no download: the Python standard library's own ``.py`` files on this
machine (site-packages excluded, files in sorted order, capped in bytes). Tokens are raw bytes
(vocab 256). Every batch is a pure function of (seed, split, step, micro-step, rank): a
generator is seeded from those numbers, so two runs with one seed see the same batches, and a
resumed run picks up the data exactly where the checkpoint left it, with no sampler state to
save. (Which stdlib files exist depends on the Python version; ``Corpus.digest`` names the
bytes actually used, and each run records it.)
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Folders never read from a corpus folder: installed packages (machine-dependent) and tooling.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn", "node_modules"}


@dataclass(frozen=True)
class Corpus:
    """The bytes of a corpus, split into train and validation tokens (uint8)."""

    train: torch.Tensor
    val: torch.Tensor
    # Where the bytes came from, for logs.
    description: str
    # sha256 of the bytes used (first 16 hex digits): two runs are comparable when these match.
    digest: str


def load_corpus(path: str, max_bytes: int, val_fraction: float, min_tokens: int) -> Corpus:
    """Read ``path`` (a file or folder; empty = the stdlib sources), keep ``max_bytes`` (0 = all).

    The last ``val_fraction`` of the bytes is the validation split. Each split must hold at least
    ``min_tokens`` tokens (one sequence plus its shifted target).
    """
    if path:
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"--data {path!r}: no such file or folder")
        files = [root] if root.is_file() else _files_under(root, suffixes=None)
        what = str(root)
    else:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _files_under(root, suffixes=(".py",))
        what = f"Python {sysconfig.get_python_version()} stdlib sources ({root})"
    data = _read_capped(files, max_bytes)
    if not data:
        raise ValueError(f"the corpus {what} is empty (no readable text files)")
    tokens = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
    if min(len(train), len(val)) < min_tokens:
        raise ValueError(
            f"the corpus {what} has {len(tokens)} bytes: its splits (train {len(train)}, val "
            f"{len(val)}) must each hold seq_len + 1 = {min_tokens} tokens; use more data, a "
            f"shorter seq_len or a larger val_fraction")
    digest = hashlib.sha256(data).hexdigest()[:16]
    description = f"{what}: {len(files)} files, {len(data):,} bytes used, sha256 {digest}"
    return Corpus(train=train, val=val, description=description, digest=digest)


def _files_under(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    """Every regular file under ``root`` in a fixed (sorted) order, pruning _SKIP_DIRS."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if suffixes is None or name.endswith(suffixes):
                found.append(Path(dirpath) / name)
    return found


def _read_capped(files: list[Path], max_bytes: int) -> bytes:
    """Concatenate the text files' bytes (binary files, with a NUL byte, skipped) up to the cap."""
    chunks, total = [], 0
    for f in files:
        try:
            blob = f.read_bytes()
        except OSError:
            continue
        if b"\0" in blob[:8192]:
            continue
        if max_bytes and total + len(blob) > max_bytes:
            blob = blob[: max_bytes - total]
        chunks.append(blob)
        total += len(blob)
        if max_bytes and total >= max_bytes:
            break
    return b"".join(chunks)


def mix_seed(*numbers: int) -> int:
    """A 63-bit seed from several integers, the same in every process and Python run."""
    digest = hashlib.blake2b(repr(numbers).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


_SPLIT_IDS = {"train": 0, "val": 1}


class Batches:
    """Random windows of the corpus; each batch is determined by its coordinates alone."""

    def __init__(self, corpus: Corpus, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, device: torch.device | str = "cpu"):
        self.corpus, self.seq_len, self.batch_size = corpus, seq_len, batch_size
        self.seed, self.rank, self.device = seed, rank, torch.device(device)

    def get(self, split: str, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 ``[batch_size, seq_len]``; targets are inputs shifted by one.

        ``step`` is the optimizer step (or the eval batch index for ``split="val"``), so the
        validation batches are the same at every evaluation.
        """
        tokens = self.corpus.train if split == "train" else self.corpus.val
        gen = torch.Generator().manual_seed(
            mix_seed(self.seed, _SPLIT_IDS[split], step, micro_step, self.rank))
        starts = torch.randint(len(tokens) - self.seq_len, (self.batch_size,), generator=gen)
        window = torch.stack([tokens[s: s + self.seq_len + 1] for s in starts.tolist()]).long()
        x, y = window[:, :-1], window[:, 1:]
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with the previous step's kernels.
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)
