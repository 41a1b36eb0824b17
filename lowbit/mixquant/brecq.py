"""Block-reconstruction PTQ in the style of BRECQ (Li et al., ICLR 2021) with AdaRound's learned rounding
(Nagel et al., ICML 2020), at a MixQuant plan's per-layer weight bits.

Each planned weight is quantized asymmetrically per output channel,
``W_q = s * (clamp(floor(W/s) + h(V) + z, 0, 2^b - 1) - z)``, with the step ``s`` and zero point ``z`` fixed
beforehand (min-max range; optionally shrunk per channel by an MSE search over clipping ratios). Only the rounding
is learned: ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (the rectified sigmoid), starting at the
fractional part of ``W/s`` and driven to 0 or 1 by AdaRound's regularizer ``lambda * sum(1 - |2h - 1|^beta)``
with ``beta`` annealed from 20 to 2 after a warm-up; the final rounding is ``h >= 1/2`` (zero iterations give
nearest rounding). Blocks (``reconstruction_units``) are reconstructed one after the other, in forward order: a
block's input comes from the model whose earlier blocks are already quantized, its target is the float model's
output of that block (BRECQ's setting, without its Fisher weighting: the loss is plain output MSE).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from lowbit.mixquant.quantizers import asymmetric_minmax, check_plan
from lowbit.mixquant.table import QUANTIZABLE

GAMMA, ZETA = -0.1, 1.1  # the rectified sigmoid's stretch (AdaRound)
CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass
class Unit:
    """One reconstruction unit: ``modules`` run in order (a block, or a layer with the leaves that follow it)."""

    name: str
    modules: list[nn.Module]

    def forward(self, *args):
        out = self.modules[0](*args)
        for m in self.modules[1:]:
            out = m(out)
        return out

    def layers(self) -> dict[nn.Module, None]:
        return {m: None for mod in self.modules for m in mod.modules() if isinstance(m, QUANTIZABLE)}


def _has_layers(module: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZABLE) for m in module.modules())


def reconstruction_units(model: nn.Module) -> list[Unit]:
    """The blocks BRECQ reconstructs, in registration order (which is forward order for the packaged models).

    Containers (``nn.Sequential``/``nn.ModuleList``, and the model itself) are opened. A custom module holding
    convs/linears (a residual or inverted-residual block, a squeeze-excitation) is one unit. A conv/linear found
    directly in a container is one unit together with the layer-free leaves after it (its BN and activation).
    """
    units: list[Unit] = []
    _collect(model, "", units, root=True)
    return units


def _collect(module: nn.Module, prefix: str, units: list[Unit], root: bool = False) -> None:
    if not (root or isinstance(module, CONTAINERS)):
        units.append(Unit(prefix, [module]))
        return
    run: Unit | None = None
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, QUANTIZABLE):
            run = Unit(full, [child])
            units.append(run)
        elif not _has_layers(child):
            if run is not None and not isinstance(module, nn.ModuleList) and not root:
                run.modules.append(child)  # a Sequential chains: BN/activation join the layer before them
        else:
            run = None
            _collect(child, full, units)


class _AdaRound(nn.Module):
    """Parametrization ``weight -> W_q`` with learned rounding; ``hard`` switches to the final 0/1 rounding."""

    def __init__(self, weight: torch.Tensor, bits: int, grid: int):
        super().__init__()
        w = weight.detach().float()
        self.levels = 2**bits - 1
        scale, zero = _mse_step(w, self.levels, grid)
        shape = (-1,) + (1,) * (w.dim() - 1)
        self.register_buffer("scale", scale.reshape(shape))
        self.register_buffer("zero", zero.reshape(shape))
        self.register_buffer("floor", torch.floor(w / self.scale))
        rest = (w / self.scale - self.floor).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(alpha) = rest
        self.hard = False

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rounding = (self.alpha >= 0).float() if self.hard else self.h()  # h >= 1/2 exactly when alpha >= 0
        q = torch.clamp(self.floor + rounding + self.zero, 0, self.levels)
        return ((q - self.zero) * self.scale).to(weight.dtype)


def _mse_step(w: torch.Tensor, levels: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel asymmetric step and zero point: min-max range shrunk by the ratio (of ``grid`` in [0.5, 1])
    that gives the least squared error with nearest rounding; all channels at once, one pass per ratio."""
    flat = w.reshape(w.shape[0], -1)
    lo, hi = flat.amin(dim=1).clamp_max(0), flat.amax(dim=1).clamp_min(0)
    best_err = torch.full_like(lo, math.inf)
    best_scale, best_zero = torch.ones_like(lo), torch.zeros_like(lo)
    for ratio in torch.linspace(1.0, 0.5, max(grid, 1)).tolist():
        scale = ((hi - lo) * ratio / levels).clamp_min(1e-12)
        zero = torch.round(-lo * ratio / scale)
        q = torch.clamp(torch.round(flat / scale[:, None]) + zero[:, None], 0, levels)
        err = ((q - zero[:, None]) * scale[:, None] - flat).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


class BRECQ:
    """Block-reconstruction PTQ (BRECQ-style, AdaRound rounding) at the plan's weight bits; activations float.

    Args:
        calibration: images (a tensor ``(N, ...)``) or a loader of ``(x, y)`` batches; the first ``samples`` are
            used. Labels are not needed.
        samples: calibration set size (BRECQ uses 1024 ImageNet images; 256 is plenty for small models).
        iters: Adam iterations per block (0 gives nearest rounding at the same steps).
        batch_size: calibration images per iteration.
        lr: Adam learning rate of the rounding variables.
        reg: AdaRound's regularizer weight ``lambda``.
        beta: (start, end) of the annealed regularizer exponent.
        warmup: fraction of ``iters`` without the regularizer.
        grid: number of clipping ratios (1.0 down to 0.5) tried for each channel's step; the default 1 keeps the
            min-max range, so ``iters=0`` is exactly ``MinMaxPTQ`` and any gain is the learned rounding's.
        device: where the reconstruction runs.
        seed: seeds the mini-batch order.

    ``qe_quantizer`` (``asymmetric_minmax``: the min-max steps and nearest rounding it starts from) is the error a
    QE table should measure for this quantizer.
    """

    qe_quantizer = staticmethod(asymmetric_minmax)

    def __init__(
        self,
        calibration,
        *,
        samples: int = 256,
        iters: int = 200,
        batch_size: int = 32,
        lr: float = 1e-2,
        reg: float = 0.01,
        beta: tuple[float, float] = (20.0, 2.0),
        warmup: float = 0.2,
        grid: int = 1,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ):
        for name, value in (("samples", samples), ("batch_size", batch_size), ("grid", grid)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"iters must be an int >= 0, got {iters!r}")
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {warmup!r}")
        self.data = _calibration_tensor(calibration, samples)
        self.iters, self.batch_size, self.lr, self.reg = iters, batch_size, lr, reg
        self.beta, self.warmup, self.grid, self.device, self.seed = beta, warmup, grid, device, seed
        self.losses: dict[
            str, tuple[float, float]
        ] = {}  # unit -> output MSE (nearest rounding, learned) on the calibration set

    def apply(self, model: nn.Module, plan: Mapping[str, int]) -> nn.Module:
        plan = check_plan(model, plan)
        model.to(self.device).eval()
        reference = copy.deepcopy(model)
        by_module = {model.get_submodule(n): b for n, b in plan.items()}
        units_q, units_f = reconstruction_units(model), reconstruction_units(reference)
        gen = torch.Generator().manual_seed(self.seed)
        for unit_q, unit_f in zip(units_q, units_f, strict=True):
            planned = [m for m in unit_q.layers() if m in by_module]
            if not planned:
                continue
            inputs = _unit_inputs(model, unit_q, self.data, self.device)
            with torch.no_grad():
                target = torch.cat([unit_f.forward(*x) for x in _batches(inputs, 256)])
            rounders = [_attach(m, by_module[m], self.grid) for m in planned]
            self.losses[unit_q.name] = self._reconstruct(unit_q, rounders, inputs, target, gen)
            for m, r in zip(planned, rounders, strict=True):
                r.hard = True
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        return model

    def _reconstruct(self, unit: Unit, rounders: list[_AdaRound], inputs, target, gen) -> tuple[float, float]:
        for r in rounders:
            r.hard = True
        before = _output_mse(unit, inputs, target)  # nearest rounding
        for r in rounders:
            r.hard = False
        if self.iters:
            opt = torch.optim.Adam([r.alpha for r in rounders], lr=self.lr)
            n = target.shape[0]
            for it in range(self.iters):
                idx = torch.randint(n, (min(self.batch_size, n),), generator=gen)
                out = unit.forward(*[x[idx] for x in inputs])
                loss = (out - target[idx]).pow(2).flatten(1).sum(1).mean() + self._round_loss(rounders, it)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for r in rounders:
            r.hard = True
        return before, _output_mse(unit, inputs, target)

    def _round_loss(self, rounders: list[_AdaRound], it: int) -> torch.Tensor | float:
        start = self.warmup * self.iters
        if it < start:
            return 0.0
        progress = (it - start) / max(self.iters - start, 1)
        beta = self.beta[1] + 0.5 * (self.beta[0] - self.beta[1]) * (1 + math.cos(math.pi * progress))
        return self.reg * sum((1 - (2 * r.h() - 1).abs().pow(beta)).sum() for r in rounders)

    def __repr__(self) -> str:
        return f"BRECQ(samples={self.data.shape[0]}, iters={self.iters}, batch_size={self.batch_size}, lr={self.lr})"


def _attach(layer: nn.Module, bits: int, grid: int) -> _AdaRound:
    rounder = _AdaRound(layer.weight, bits, grid)
    parametrize.register_parametrization(layer, "weight", rounder, unsafe=True)
    layer.parametrizations.weight.original.requires_grad_(False)
    return rounder


def _calibration_tensor(calibration, samples: int) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        data = calibration[:samples]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        chunks, count = [], 0
        for batch in calibration:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"calibration must yield image tensors or (x, y) batches, got {type(x).__name__}")
            chunks.append(x)
            count += len(x)
            if count >= samples:
                break
        data = torch.cat(chunks)[:samples] if chunks else torch.empty(0)
    else:
        raise TypeError(f"calibration must be a tensor of images or a loader, got {type(calibration).__name__}")
    if data.numel() == 0 or not data.is_floating_point():
        raise ValueError(f"calibration must hold at least one float image, got shape {tuple(data.shape)}")
    return data.detach()


def _batches(inputs: list[torch.Tensor], size: int):
    for i in range(0, inputs[0].shape[0], size):
        yield [x[i : i + size] for x in inputs]


@torch.no_grad()
def _unit_inputs(model: nn.Module, unit: Unit, data: torch.Tensor, device) -> list[torch.Tensor]:
    """The unit's positional inputs on the calibration set, through the (partly quantized) model."""
    captured: list[tuple] = []

    def hook(_module, args):
        captured.append(tuple(a.detach() for a in args))
        raise _Stop

    handle = unit.modules[0].register_forward_pre_hook(hook)
    try:
        for i in range(0, data.shape[0], 256):
            try:
                model(data[i : i + 256].to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return [torch.cat(parts) for parts in zip(*captured, strict=True)]


class _Stop(Exception):
    """Ends a forward pass once the unit's input is captured."""


@torch.no_grad()
def _output_mse(unit: Unit, inputs, target) -> float:
    out = torch.cat([unit.forward(*x) for x in _batches(inputs, 256)])
    return float((out - target).pow(2).mean())
