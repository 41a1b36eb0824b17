"""Checkpoints written so that a killed run loses at most the epoch in progress, and restored so that the resumed
run is the uninterrupted one: model, alphas (part of the model), optimizers, schedulers, every RNG (torch,
CUDA, NumPy, Python and the data loaders' generators), phase and epoch, plus the records logged so far.

Writes are atomic: a temporary file in the same directory, flushed and fsynced, then ``os.replace`` (and the
directory fsynced), so a reader sees the old checkpoint or the new one, never half of one.

No pickle: a checkpoint is a ``lowbit.checkpoint`` safetensors file (``lowbit.serialization.state_bytes``),
tensors plus JSON, RNG states as tensors, so reading one runs no code. Checkpoints of lowbit before that
(``metamix.pt``, pickled) are read only by ``migrate(directory, allow_pickle=True)``, which rewrites them.
"""

from __future__ import annotations

import glob
import json
import os
import random
import tempfile

import numpy as np
import torch

from lowbit.tools import serialization

CHECKPOINT = "metamix.safetensors"
LEGACY_CHECKPOINT = "metamix.pt"  # pickled by lowbit before the safetensors checkpoints
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
    atomic_write(checkpoint_path(directory), lambda f: f.write(serialization.state_bytes(state)))


def load(directory: str) -> dict | None:
    """The checkpoint in ``directory`` (None if there is none); removes temporary files a killed write left.
    A pickled checkpoint of an older lowbit is refused (ValueError) until ``migrate`` rewrote it."""
    for stale in glob.glob(os.path.join(directory, _TMP_PREFIX + "*")):
        os.remove(stale)
    path = checkpoint_path(directory)
    if not os.path.exists(path):
        legacy = os.path.join(directory, LEGACY_CHECKPOINT)
        if os.path.exists(legacy):
            raise ValueError(
                f"{legacy!r} is a pickled checkpoint of an older lowbit, and unpickling can run any code it holds: "
                f"if you wrote it, rewrite it once with lowbit.metamix.checkpoint.migrate({directory!r}, "
                "allow_pickle=True) (lowbit metamix: --resume --allow-pickle)"
            )
        return None
    return serialization.read_state(path)


def migrate(directory: str, *, allow_pickle: bool = False) -> bool:
    """Rewrites a pickled ``metamix.pt`` of an older lowbit as ``metamix.safetensors`` (RNG states as tensors);
    the old file is left in place. Returns whether it rewrote one (False: nothing to do).

    ``allow_pickle=True`` is required: it unpickles the old file fully, which runs whatever code it contains,
    so pass it only for a checkpoint you wrote yourself.
    """
    legacy = os.path.join(directory, LEGACY_CHECKPOINT)
    if os.path.exists(checkpoint_path(directory)) or not os.path.exists(legacy):
        return False
    if not allow_pickle:
        raise ValueError(
            f"{legacy!r} is a pickled checkpoint: migrating it unpickles it, which can run any code it holds; "
            "pass allow_pickle=True (lowbit metamix: --allow-pickle) only if you wrote it"
        )
    state = serialization.torch_load(legacy, allow_pickle=True)
    if not isinstance(state, dict) or "rng" not in state:
        raise ValueError(f"{legacy!r} is not a MetaMix checkpoint (a dict with 'rng', 'model', ...)")
    state = {**state, "rng": [_rng_from_pickled(r) for r in state["rng"]]}
    save(directory, state)
    return True


def rewrite_log(path: str, records: list[dict]) -> None:
    """Replaces the JSON-lines log by exactly the checkpoint's records: no epoch lost or logged twice on resume."""
    text = "".join(json.dumps(r, default=float) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def rng_state(generators: list[torch.Generator]) -> dict:
    """Every RNG's state as tensors and numbers (what a checkpoint stores without pickle)."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_name,
            "key": torch.from_numpy(np_key.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_from_pickled(state: dict) -> dict:
    """An older checkpoint's RNG state (NumPy and Python states as tuples) in ``rng_state``'s form."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = state["numpy"]
    py_version, py_internal, py_gauss = state["python"]
    numpy_state = {
        "bit_generator": np_name,
        "key": torch.from_numpy(np.asarray(np_key).astype(np.int64)),
        "pos": int(np_pos),
        "has_gauss": int(np_has_gauss),
        "cached_gaussian": float(np_gauss),
    }
    python_state = {
        "version": py_version,
        "internal": torch.tensor(py_internal, dtype=torch.int64),
        "gauss_next": py_gauss,
    }
    return {**state, "numpy": numpy_state, "python": python_state}


def set_rng_state(state: dict, generators: list[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state((n["bit_generator"], key, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if len(state["generators"]) != len(generators):
        raise ValueError(
            f"the checkpoint saved {len(state['generators'])} data-loader generator(s) but the loaders now have "
            f"{len(generators)}: resume with the same loaders"
        )
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
