"""One mini-batch of each mode, as ``lowbit.tools.train`` step functions (``step(x, y) -> StepResult``).

Freezing is real, not a matter of which optimizer happens to step:

* bit-meta step: alpha has ``requires_grad`` off (single process) and the alpha optimizer does not step, so
  alpha is unchanged bit for bit;
* bit-search step: weights and steps have ``requires_grad`` off, the weight optimizer does not step, and the
  BatchNorm running statistics are restored after the forward. BN still *normalises with the batch statistics*
  (train mode), the same forward the bit-meta step trains the weights under; only its running buffers (and
  ``num_batches_tracked``) are put back, so the search leaves every buffer as it found it.

Under DDP ``requires_grad`` is not toggled (see ``distributed``); the optimizers and the BN restore still freeze.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.metamix.cost import CostModel, multi_branch_layers, penalty
from lowbit.tools.train import StepResult


@contextmanager
def frozen_bn_stats(model: nn.Module):
    """Restores every BatchNorm buffer (running mean/var, batch count) on exit, bit for bit."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(norms, saved, strict=True):
                for key, value in buffers.items():
                    getattr(module, key).copy_(value)


@contextmanager
def requires_grad(params: list[nn.Parameter], flag: bool, enabled: bool = True):
    """Sets ``requires_grad`` of ``params`` to ``flag`` inside the block (no-op when not ``enabled``)."""
    before = [p.requires_grad for p in params]
    if enabled:
        for p in params:
            p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, b in zip(params, before, strict=True):
            p.requires_grad_(b)


@dataclass
class StepContext:
    """What the step functions share: the (maybe DDP-wrapped) model, its inner module, optimizers, budget."""

    model: nn.Module
    inner: nn.Module
    device: torch.device
    w_opt: torch.optim.Optimizer
    a_opt: torch.optim.Optimizer | None
    weights: list[nn.Parameter]
    alphas: list[nn.Parameter]
    cost: CostModel | None = None
    target: float | None = None
    lam: float = 0.0
    toggle: bool = True  # toggle requires_grad (off under DDP)

    def extras(self) -> dict[str, float]:
        """Expected BOPs (millions), its ratio to the target and the expected average bits, for the bar/log."""
        if not self.alphas:
            return {}
        with torch.no_grad():
            ebops = float(self.cost.expected_bops(self.inner))
            bits = {n: float(m.expected_bits()) for n, m in multi_branch_layers(self.inner)}
        return {"ebops_M": ebops / 1e6, "ebops/target": ebops / self.target, "bits": self.cost.avg_bits(bits)}


def _forward_loss(ctx: StepContext, x, y, with_penalty: bool):
    x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
    logits = ctx.model(x)
    loss = F.cross_entropy(logits, y)
    if with_penalty:
        loss = loss + penalty(ctx.inner, ctx.cost, ctx.target, ctx.lam)
    ctx.inner.zero_grad(set_to_none=True)
    loss.backward()
    return float(loss.detach()), int((logits.argmax(dim=1) == y).sum()), len(y)


def bit_meta(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
    """W and steps learn the task through the current mixture of branches; alpha stays as it is."""
    ctx.model.train()
    with requires_grad(ctx.alphas, False, ctx.toggle):
        result = _forward_loss(ctx, x, y, with_penalty=False)
    ctx.w_opt.step()
    return result


def bit_search(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
    """Alpha learns task loss + penalty on the fixed meta-state; W, steps and BN statistics stay as they are."""
    ctx.model.train()
    with requires_grad(ctx.weights, False, ctx.toggle), frozen_bn_stats(ctx.inner):
        result = _forward_loss(ctx, x, y, with_penalty=True)
    ctx.a_opt.step()
    return result


def metamix_step(ctx: StepContext, search_batches: Callable[[], Iterator]) -> Callable:
    """Bit-meta step on the loop's batch, then bit-search step on the next batch of the search loader."""
    state = {"it": None}

    def next_search_batch():
        if state["it"] is None:
            state["it"] = search_batches()
        try:
            return next(state["it"])
        except StopIteration:  # the search loader is shorter than the train loader: start it again
            state["it"] = search_batches()
            return next(state["it"])

    def step(x: torch.Tensor, y: torch.Tensor) -> StepResult:
        loss, correct, count = bit_meta(ctx, x, y)
        search_loss, _, _ = bit_search(ctx, *next_search_batch())
        return StepResult(loss, correct, count, {"search_loss": search_loss, **ctx.extras()})

    return step


def joint_step(ctx: StepContext) -> Callable:
    """EdMIPS-style: one forward/backward of task loss + penalty updates W, steps and alpha together."""
    return _one_pass_step(ctx, with_penalty=True)


def weight_step(ctx: StepContext) -> Callable:
    """Plain (QAT or float) training of every parameter: the FP warm-up, uniform LSQ and the weight phase."""
    return _one_pass_step(ctx, with_penalty=False)


def _one_pass_step(ctx: StepContext, with_penalty: bool) -> Callable:
    """One forward/backward on the loop's batch, then the weight optimizer steps (and, with the penalty, the alpha
    optimizer too: the penalty is what alpha learns from)."""
    optimizers = [ctx.w_opt, ctx.a_opt] if with_penalty else [ctx.w_opt]

    def step(x: torch.Tensor, y: torch.Tensor) -> StepResult:
        ctx.model.train()
        loss, correct, count = _forward_loss(ctx, x, y, with_penalty)
        for optimizer in optimizers:
            optimizer.step()
        return StepResult(loss, correct, count, ctx.extras() if with_penalty else {})

    return step
