"""Checkpoints written so that a killed run loses at most the epoch in progress, and restored so that the resumed
run is the uninterrupted one: model, alphas (part of the model), optimizers, schedulers, every RNG (torch,
CUDA, NumPy, Python and the data loaders' generators), phase and epoch, plus the records logged so far.

Writes are atomic: a temporary file in the same directory, flushed and fsynced, then ``os.replace`` (and the
directory fsynced), so a reader sees the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import glob
import json
import os
import random
import tempfile

import numpy as np
import torch

CHECKPOINT = "metamix.pt"
_TMP_PREFIX = ".metamix-tmp-"


def checkpoint_path(directory: str) -> str:
    return os.path.join(directory, CHECKPOINT)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Calls ``write(file)`` on a temporary file next to ``path`` and moves it into place atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def save(directory: str, state: dict) -> None:
    atomic_write(checkpoint_path(directory), lambda f: torch.save(state, f))


def load(directory: str) -> dict | None:
    """The checkpoint in ``directory`` (None if there is none); removes temporary files a killed write left."""
    for stale in glob.glob(os.path.join(directory, _TMP_PREFIX + "*")):
        os.remove(stale)
    path = checkpoint_path(directory)
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file: it holds RNG tuples


def rewrite_log(path: str, records: list[dict]) -> None:
    """Replaces the JSON-lines log by exactly the checkpoint's records: no epoch lost or logged twice on resume."""
    text = "".join(json.dumps(r, default=float) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def rng_state(generators: list[torch.Generator]) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: list[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if len(state["generators"]) != len(generators):
        raise ValueError(
            f"the checkpoint saved {len(state['generators'])} data-loader generator(s) but the loaders now have "
            f"{len(generators)}: resume with the same loaders"
        )
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
