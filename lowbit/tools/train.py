"""One small training loop shared by full-precision training, LSQ QAT, MixQuant fine-tuning, MetaMix and the demo.

An epoch is ``run_epoch(loader, step)``: ``step(x, y)`` does whatever one mini-batch means for the caller (a plain
SGD step, a MetaMix bit-meta + bit-search pair...) and returns a ``StepResult``; the loop averages the results,
shows them on a tqdm bar and returns them. ``fit`` is the common case (cross-entropy, SGD with cosine schedule).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StepResult:
    loss: float
    correct: int
    count: int
    extras: dict[str, float] = field(default_factory=dict)  # shown on the progress bar, averaged per epoch


def set_seed(seed: int) -> None:
    """Seeds Python, NumPy and torch (CPU and CUDA) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress_bar(iterable: Iterable, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def run_epoch(
    loader: Iterable, step: Callable[[torch.Tensor, torch.Tensor], StepResult], desc: str = "", progress: bool = True
) -> dict[str, float]:
    """Calls ``step`` on every batch; returns the epoch's mean loss, accuracy (%), extras and wall time."""
    start = time.perf_counter()
    loss_sum, correct, count = 0.0, 0, 0
    extras: dict[str, float] = {}
    bar = progress_bar(loader, desc, progress)
    for x, y in bar:
        result = step(x, y)
        loss_sum += result.loss * result.count
        correct += result.correct
        count += result.count
        for key, value in result.extras.items():
            extras[key] = value  # the latest value: expected BOPs, average bits... are states, not sums
        if progress:
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{100 * correct / count:.1f}", **_short(extras))
    return {
        "loss": loss_sum / max(count, 1),
        "acc": 100.0 * correct / max(count, 1),
        **extras,
        "seconds": time.perf_counter() - start,
    }


def _short(extras: dict[str, float]) -> dict[str, str]:
    return {key: f"{value:.3g}" for key, value in extras.items()}


def supervised_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str = "cpu",
    penalty: Callable[[], torch.Tensor] | None = None,
    extras: Callable[[], dict[str, float]] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], StepResult]:
    """A step that trains ``model`` on cross-entropy (plus ``penalty()`` if given) with ``optimizer``."""

    def step(x: torch.Tensor, y: torch.Tensor) -> StepResult:
        model.train()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if penalty is not None:
            loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct = int((logits.argmax(dim=1) == y).sum())
        return StepResult(float(loss.detach()), correct, len(y), extras() if extras is not None else {})

    return step


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy (%) of ``model`` in eval mode over ``loader``."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
        count += len(y)
    model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "acc": 100.0 * correct / max(count, 1)}


def make_optimizer(params, lr: float, weight_decay: float = 5e-4, kind: str = "sgd") -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9 (``kind="sgd"``) or Adam (``kind="adam"``); no decay on 1-d parameters."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"optimizer kind must be 'sgd' or 'adam', got {kind!r}")


def fit(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable | None,
    epochs: int,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    optimizer: str = "sgd",
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: JsonLog | None = None,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Trains ``model`` on cross-entropy for ``epochs`` with a cosine learning-rate schedule; one record per epoch."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    opt = make_optimizer(model.parameters(), lr, weight_decay, optimizer)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    step = supervised_step(model, opt, device)
    history = []
    for epoch in range(epochs):
        record = {"epoch": epoch, **run_epoch(train_loader, step, f"{desc} {epoch + 1}/{epochs}", progress)}
        schedule.step()
        if test_loader is not None:
            record.update({f"test_{k}": v for k, v in evaluate(model, test_loader, device).items()})
        history.append(record)
        if log is not None:
            log.write(phase=desc, **record)
    return history


class JsonLog:
    """Appends one JSON object per line to ``path`` (flushed at once, so a killed run keeps its history)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def write(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
