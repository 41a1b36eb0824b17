"""LSQ code the way public repositories write it, for the swap_fused tests and bench/bench_swap.py.

Written from the common idioms, not copied: lsq-net's ``LsqQuan`` (parameter ``s``, ``thd_neg``/``thd_pos``,
``grad_scale(s, 1/sqrt(thd_pos * numel))``, ``round_pass(clamp(x / s)) * s``, per-channel weights with a
keepdim-shaped ``s``) inside ``QuanConv2d``/``QuanLinear``; an LSQ+ quantizer with a learnable offset; the other
ways of writing the straight-through round and the gradient scale; and a few modules that are NOT LSQ.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# ---- lsq-net ------------------------------------------------------------------------------------------------


def grad_scale(x, scale):
    y, y_grad = x, x * scale
    return (y - y_grad).detach() + y_grad


def round_pass(x):
    y, y_grad = x.round(), x
    return (y - y_grad).detach() + y_grad


class LsqQuan(nn.Module):
    def __init__(self, bit, all_positive=False, symmetric=False, per_channel=True):
        super().__init__()
        if all_positive:
            self.thd_neg, self.thd_pos = 0, 2**bit - 1
        elif symmetric:
            self.thd_neg, self.thd_pos = -(2 ** (bit - 1)) + 1, 2 ** (bit - 1) - 1
        else:
            self.thd_neg, self.thd_pos = -(2 ** (bit - 1)), 2 ** (bit - 1) - 1
        self.per_channel = per_channel
        self.s = nn.Parameter(torch.ones(1))

    def init_from(self, x):
        if self.per_channel:
            mean = x.detach().abs().mean(dim=list(range(1, x.dim())), keepdim=True)
            self.s = nn.Parameter(mean * 2 / (self.thd_pos**0.5))
        else:
            self.s = nn.Parameter(x.detach().abs().mean() * 2 / (self.thd_pos**0.5))

    def forward(self, x):
        s_grad_scale = 1.0 / ((self.thd_pos * x.numel()) ** 0.5)  # lsq-net: numel of x, even per channel
        s_scale = grad_scale(self.s, s_grad_scale)
        x = x / s_scale
        x = torch.clamp(x, self.thd_neg, self.thd_pos)
        x = round_pass(x)
        return x * s_scale


class QuanConv2d(nn.Conv2d):
    def __init__(self, m: nn.Conv2d, quan_w_fn, quan_a_fn):
        super().__init__(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            bias=m.bias is not None,
        )
        self.quan_w_fn, self.quan_a_fn = quan_w_fn, quan_a_fn
        self.weight = nn.Parameter(m.weight.detach())
        self.quan_w_fn.init_from(m.weight)
        if m.bias is not None:
            self.bias = nn.Parameter(m.bias.detach())

    def forward(self, x):
        return self._conv_forward(self.quan_a_fn(x), self.quan_w_fn(self.weight), self.bias)


class QuanLinear(nn.Linear):
    def __init__(self, m: nn.Linear, quan_w_fn, quan_a_fn):
        super().__init__(m.in_features, m.out_features, bias=m.bias is not None)
        self.quan_w_fn, self.quan_a_fn = quan_w_fn, quan_a_fn
        self.weight = nn.Parameter(m.weight.detach())
        self.quan_w_fn.init_from(m.weight)
        if m.bias is not None:
            self.bias = nn.Parameter(m.bias.detach())

    def forward(self, x):
        return nn.functional.linear(self.quan_a_fn(x), self.quan_w_fn(self.weight), self.bias)


def lsq_net_quantize(model: nn.Module, bits: int = 4, first_signed: bool = True) -> nn.Module:
    """Every conv/linear -> QuanConv2d/QuanLinear with per-channel signed weights and per-tensor activations,
    unsigned (``all_positive``) except the first layer's (the image), as lsq-net's configuration does."""
    first = True
    for name, m in list(model.named_modules()):
        if type(m) not in (nn.Conv2d, nn.Linear):
            continue
        act = LsqQuan(bits, all_positive=not (first and first_signed), per_channel=False)
        wrap = QuanConv2d if isinstance(m, nn.Conv2d) else QuanLinear
        model.set_submodule(name, wrap(m, LsqQuan(bits, per_channel=True), act))
        first = False
    return model


# ---- other idioms ---------------------------------------------------------------------------------------------


class LSQPlus(nn.Module):
    """LSQ+ (learnable offset), grad scale as ``x.detach() + (x*g - (x*g).detach())`` on both step and offset."""

    def __init__(self, bits: int, signed: bool = True, step: float = 0.1, offset: float = -0.05):
        super().__init__()
        self.Qn, self.Qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        self.s = nn.Parameter(torch.tensor([step]))
        self.beta = nn.Parameter(torch.tensor([offset]))

    def forward(self, x):
        g = 1.0 / math.sqrt(x.numel() * self.Qp)
        s = self.s.detach() + (self.s * g - (self.s * g).detach())
        beta = self.beta.detach() + (self.beta * g - (self.beta * g).detach())
        v = torch.clamp((x - beta) / s, self.Qn, self.Qp)
        return ((v.round() - v).detach() + v) * s + beta


class ClampFirst(nn.Module):
    """Clamp before the division (``clamp(x, Qn*s, Qp*s) / s``), round written ``(x.round() - x).detach() + x``,
    per-channel along axis 1 with a (1, C, 1, 1) step and the per-channel count in the grad scale."""

    def __init__(self, channels: int, bits: int = 4):
        super().__init__()
        self.thd_neg, self.thd_pos = 0, 2**bits - 1
        self.step = nn.Parameter(torch.linspace(0.05, 0.2, channels).reshape(1, channels, 1, 1))

    def forward(self, x):
        g = 1.0 / math.sqrt(x.numel() / self.step.numel() * self.thd_pos)
        s = (self.step - self.step * g).detach() + self.step * g
        v = torch.clamp(x, self.thd_neg * s, self.thd_pos * s) / s
        return ((v.round() - v).detach() + v) * s


class ViewPerChannel(nn.Module):
    """A 1-D step viewed per output channel inside forward; no grad scale at all."""

    def __init__(self, channels: int, bits: int = 4):
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.linspace(0.01, 0.03, channels))

    def forward(self, w):
        qn, qp = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        s = self.alpha.view(-1, *([1] * (w.dim() - 1)))
        v = (w / s).clamp(qn, qp)
        return (v + (v.round() - v).detach()) * s


class Reciprocal(nn.Module):
    """``x * (1/s)`` instead of ``x / s``: not SPEC's formula, equal within a rounding of the quotient."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.qmax = 2**bits - 1
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, x):
        v = torch.clamp(x * (1.0 / self.scale), 0, self.qmax)
        return ((v.round() - v).detach() + v) * self.scale


class LazyInitLSQ(nn.Module):
    """Initialises its step on the first batch behind ``if self.init_state == 0`` (a tensor test fx cannot
    trace), with the round-pass as a custom autograd.Function: recognised by behaviour alone."""

    def __init__(self, bits: int = 4):
        super().__init__()
        self.Qp = 2 ** (bits - 1) - 1
        self.Qn = -(2 ** (bits - 1))
        self.step_size = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("init_state", torch.zeros(1))

    def forward(self, x):
        if self.init_state == 0:
            self.step_size.data.copy_(2 * x.abs().mean() / math.sqrt(self.Qp))
            self.init_state.fill_(1)
        g = 1.0 / math.sqrt(x.numel() * self.Qp)
        s = grad_scale(self.step_size, g)
        return _RoundSTE.apply(torch.clamp(x / s, self.Qn, self.Qp)) * s


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, g):
        return g


# ---- not LSQ: must be kept, with the reason ----------------------------------------------------------------


class ClampAfterRound(nn.Module):
    """Clamps the ROUNDED value: the x gradient passes half a step beyond the range (torch.ao's learnable op)."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor([0.1]))

    def forward(self, x):
        return round_pass(x / self.s).clamp(-8, 7) * self.s


class InlineQuantConv(nn.Conv2d):
    """Quantizes its weight inline in its own forward: no separate quantizer module to replace."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.s_w = nn.Parameter(torch.tensor([0.05]))

    def forward(self, x):
        w = round_pass(torch.clamp(self.weight / self.s_w, -8, 7)) * self.s_w
        return self._conv_forward(x, w, self.bias)
