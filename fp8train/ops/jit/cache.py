"""On-disk cache entries: one directory per compiled kernel, published by an atomic rename.

An entry `<cache>/kernels/<name>-<hash16>/` holds `kernel.cu` (the source, for debugging),
`kernel.cubin` and `meta.json` (ptxas report and the cubin's sha256). Writers build the whole
entry in a private temp directory and rename it into place, so a reader sees either no entry
or a complete one; an entry whose cubin is missing or does not match its sha256 is treated as
absent and replaced.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

CUBIN = "kernel.cubin"
SOURCE = "kernel.cu"
META = "meta.json"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_meta(entry: Path) -> dict | None:
    """The entry's meta.json if the entry is complete and its cubin matches, else None."""
    try:
        meta = json.loads((entry / META).read_text())
        digest = sha256_file(entry / CUBIN)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("cubin_sha256") != digest:
        return None
    return meta


def write_meta(entry: Path, meta: dict) -> None:
    (entry / META).write_text(json.dumps(meta, indent=1, sort_keys=True))


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def publish(staging: Path, entry: Path) -> tuple[Path, dict]:
    """Move the complete directory `staging` to `entry`; return (entry, meta of what is there).

    If another process published first and its entry is valid, ours is dropped and theirs
    kept (same key, same content). A corrupt entry is first renamed aside (atomic), then
    removed, so no reader ever opens a half-replaced directory.
    """
    meta = read_meta(staging)
    if meta is None:
        raise RuntimeError(f"internal error: staged cache entry {staging} is incomplete")
    for _ in range(8):
        try:
            os.rename(staging, entry)
            return entry, meta
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        existing = read_meta(entry)
        if existing is not None:
            _discard(staging)
            return entry, existing
        aside = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(entry, aside)
        except FileNotFoundError:
            continue  # someone else moved it aside already; retry our rename
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            continue
        _discard(aside)
    raise RuntimeError(f"could not publish cache entry {entry} (kept contending with others)")
