"""``swap_fused``: replace the slow fake-quant modules a model already has by fused ones, whatever their class.

Three ways in, tried in this order for every module of the model:

1. ``register_fake_quant(cls, to_fused)``: the user says how a class maps to a fused module.
2. The torch.ao ``FakeQuantize`` / ``_LearnableFakeQuantize`` mapping (``FusedFakeQuantize``).
3. Recognition by behaviour: a module whose own forward (traced with ``torch.fx``) rounds, and which holds a
   learnable step, is fitted to SPEC section 1's quantizer. The graph names the parameters: the divisor of the
   input is the step ``s``, what is subtracted before the division is the LSQ+ offset. Probe batches then read
   the rest from what the module does: the integer range (so ``thd_neg``/``thd_pos`` however they are stored),
   the channel axis, and the gradient scale of the step as ``c * numel(x)^p`` (lsq-net's ``1/sqrt(Qp*numel)``,
   the per-channel count, a constant, none). The replacement, ``FusedLSQ``, holds the SAME ``nn.Parameter``
   objects under the same names, so optimizers, ``state_dict`` keys and checkpoints keep working.

Every swap is checked on probe batches before it is made: forward values, and the gradients of x, the step and
the offset, against the original module. It is refused (the module kept, with the reason in the report) when
they differ. Quantizer-looking modules that were not swapped are listed in the report with the reason.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from lowbit.ops import fake_quant, quant_range

# A step-like parameter name (lower case): what LSQ code calls its learnable step size.
STEP_NAMES = ("s", "step", "step_size", "scale", "alpha", "s_w", "s_a", "delta", "clip_val")
# Tolerances of the probe check (see ``_compare``): one float32 rounding of ``x * (1/s)`` against ``x / s`` or of
# the round-pass trick's forward value; SPEC section 1's bound for the step and offset gradients.
VALUE_RTOL = 2.0**-20
GRAD_RTOL = 1e-4
NEAR_TIE = 1e-5  # |v - tie| below this (relative to max(1, |v|)): the two formulas may round apart


# ---------------------------------------------------------------------------------------------------------------
# The report and the registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SwapReport:
    swapped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, old type, new type)
    kept: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, why it was not swapped)
    notes: dict[str, str] = field(default_factory=dict)  # name -> what the swap check found (exact, tolerance)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} module(s) for fused lowbit ones"]
        for name, old, new in self.swapped:
            note = self.notes.get(name)
            lines.append(f"  {name}: {old} -> {new}" + (f" [{note}]" if note else ""))
        if self.kept:
            lines.append(f"kept {len(self.kept)} quantizer-looking module(s):")
            lines += [f"  {name}: {kind} ({why})" for name, kind, why in self.kept]
            lines.append("  (lowbit.register_fake_quant(TheirClass, to_fused) swaps what the pattern cannot see)")
        return "\n".join(lines)


_REGISTRY: dict[type, Callable[[nn.Module], nn.Module]] = {}


def register_fake_quant(cls: type, to_fused: Callable[[nn.Module], nn.Module]) -> None:
    """Tells ``swap_fused`` to replace modules of ``cls`` (and its subclasses) by ``to_fused(module)``.

    ``to_fused`` returns the fused module (e.g. a ``lowbit.nn.LSQQuantizer`` or a module calling
    ``lowbit.fake_quant``). Each replacement is still checked on a probe batch (``swap_fused`` keeps the module
    when the check fails). Registering a class again replaces its earlier ``to_fused``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be a subclass of torch.nn.Module, got {cls!r}")
    if not callable(to_fused):
        raise TypeError(f"to_fused must be callable (module -> fused module), got {type(to_fused).__name__}")
    _REGISTRY[cls] = to_fused


def _registered(module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


# ---------------------------------------------------------------------------------------------------------------
# torch.ao fake-quant modules
# ---------------------------------------------------------------------------------------------------------------


def bits_for_range(qmin: int, qmax: int) -> tuple[int, bool] | None:
    """(bits, signed) whose SPEC range is exactly [qmin, qmax], or None."""
    for b in range(2, 9):
        if (qmin, qmax) == quant_range(b, False):
            return b, False
        if (qmin, qmax) == quant_range(b, True):
            return b, True
    return None


class FusedFakeQuantize(nn.Module):
    """A torch.ao ``FakeQuantize`` / ``_LearnableFakeQuantize`` running on ``lowbit.fake_quant``.

    It keeps the original module's observer, scale and zero point (learnable ones stay parameters) and its
    enable flags. The affine zero point becomes the LSQ+ offset ``-zero_point * scale``: the forward values are
    torch's (up to the rounding of ``x * (1/scale)`` against ``x / scale`` at exact ties); gradients follow LSQ
    (SPEC section 1), which differ from torch's learnable op where ``v`` is within half a step outside the range.
    """

    def __init__(self, original: nn.Module, bits: int, signed: bool):
        super().__init__()
        self.original = original
        self.bits, self.signed = bits, signed
        qscheme = original.activation_post_process.qscheme
        per_channel = qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        self.axis = original.ch_axis if per_channel else None
        self.learnable = hasattr(original, "learning_enabled")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fq = self.original
        if not self.learnable and fq.observer_enabled[0] == 1:
            fq.activation_post_process(x.detach())
            scale, zero_point = fq.calculate_qparams()
            fq.scale.resize_(scale.shape).copy_(scale)
            fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
        elif self.learnable and fq.static_enabled[0] == 1:
            fq.activation_post_process(x.detach())
            scale, zero_point = fq.activation_post_process.calculate_qparams()
            with torch.no_grad():
                fq.scale.data.copy_(scale.to(fq.scale.device).float())
                fq.zero_point.data.copy_(zero_point.to(fq.zero_point.device).float())
        if fq.fake_quant_enabled[0] != 1:
            return x
        scale = fq.scale.abs().clamp_min(getattr(fq, "eps", torch.tensor(1e-12)).item()) if self.learnable else fq.scale
        offset = -fq.zero_point.float().round() * scale
        grad_factor = getattr(fq, "grad_factor", None) if self.learnable else None
        return fake_quant(
            x, scale.float(), self.bits, signed=self.signed, offset=offset, axis=self.axis, grad_scale=grad_factor
        )


def _ao_replacement(module: nn.Module) -> tuple[nn.Module | None, str]:
    from torch.ao.quantization import FakeQuantize
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    if not isinstance(module, (FakeQuantize, _LearnableFakeQuantize)):
        return None, ""
    mapped = bits_for_range(module.quant_min, module.quant_max)
    if mapped is None:
        return None, f"range [{module.quant_min}, {module.quant_max}] is no 2..8-bit signed/unsigned range"
    return FusedFakeQuantize(module, *mapped), ""


# ---------------------------------------------------------------------------------------------------------------
# The fused module of a recognised LSQ computation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LSQFit:
    """What the probes read from a user's quantizer: SPEC section 1's parameters of its computation."""

    step_name: str
    offset_name: str | None
    bits: int
    signed: bool
    axis: int | None  # channel axis of x for a per-channel step, None per-tensor
    gs_coef: float  # gradient scale of step/offset = gs_coef * numel(x) ** gs_power
    gs_power: float

    def describe(self) -> str:
        per = "per-tensor" if self.axis is None else f"per-channel axis {self.axis}"
        sign = "signed" if self.signed else "unsigned"
        power = {0.0: "", -0.5: " / sqrt(numel(x))", -1.0: " / numel(x)"}[self.gs_power]
        offset = f", offset {self.offset_name}" if self.offset_name else ""
        return f"{self.bits}-bit {sign} {per}, step {self.step_name}{offset}, grad scale {self.gs_coef:.6g}{power}"


class FusedLSQ(nn.Module):
    """A user's LSQ / LSQ+ quantizer running on ``lowbit.fake_quant``.

    It holds the original module's parameters, buffers and children under their own names (the very same
    objects: optimizers and ``state_dict`` keys keep working) and copies its plain attributes (``thd_pos``, ...).
    """

    def __init__(self, original: nn.Module, fit: LSQFit):
        super().__init__()
        for key, value in vars(original).items():
            if not key.startswith("_") and key != "training" and isinstance(value, (bool, int, float, str)):
                setattr(self, key, value)
        for name, param in original._parameters.items():
            self.register_parameter(name, param)
        for name, buf in original._buffers.items():
            self.register_buffer(name, buf, persistent=name not in original._non_persistent_buffers_set)
        for name, child in original._modules.items():
            self.add_module(name, child)
        self.fit = fit
        self.source = type(original).__name__
        self.train(original.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fit = self.fit
        step = getattr(self, fit.step_name)
        offset = getattr(self, fit.offset_name) if fit.offset_name else None
        if not fit.gs_power:
            grad_scale = fit.gs_coef
        elif not torch.compiler.is_compiling():
            grad_scale = fit.gs_coef * x.numel() ** fit.gs_power
        else:  # the size may be symbolic (dynamic shapes) and fake_quant takes a float: scale the gradient here
            factor = fit.gs_coef * x.numel() ** fit.gs_power
            step, grad_scale = _scaled_gradient(step, factor), 1.0
            offset = None if offset is None else _scaled_gradient(offset, factor)
        return fake_quant(x, step, fit.bits, signed=fit.signed, offset=offset, axis=fit.axis, grad_scale=grad_scale)

    def extra_repr(self) -> str:
        return f"from {self.source}: {self.fit.describe()}"


def _scaled_gradient(t: torch.Tensor, factor) -> torch.Tensor:
    """Forward: t, exactly (the added term is exactly 0). Backward: gradient times ``factor``."""
    scaled = t * factor
    return t.detach() + (scaled - scaled.detach())


# ---------------------------------------------------------------------------------------------------------------
# Reading the graph: which parameter is the step, which the offset
# ---------------------------------------------------------------------------------------------------------------


class _OwnCodeTracer(fx.Tracer):
    """Traces only the module's own forward: every child module stays one opaque call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_own_code(module: nn.Module) -> tuple[fx.Graph | None, str]:
    """The fx graph of ``module``'s own forward, or (None, why it could not be traced)."""
    try:
        with _Restored(module):  # tracing runs the Python code: a lazy initialiser may touch real buffers
            return _OwnCodeTracer().trace(module), ""
    except Exception as e:  # noqa: BLE001  (any failure of user code under tracing is a reason to report)
        return None, f"torch.fx could not trace it: {type(e).__name__}: {str(e).splitlines()[0][:100]}"


_ROUND = {torch.round, torch.Tensor.round}
_CLAMP = {torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip, torch.clamp_min, torch.clamp_max}
_DIV = {operator.truediv, torch.div, torch.true_divide, torch.Tensor.div}
_MUL = {operator.mul, torch.mul, torch.Tensor.mul}
_SUB = {operator.sub, torch.sub, torch.Tensor.sub}


def _target_of(node: fx.Node):
    if node.op == "call_method":
        return getattr(torch.Tensor, node.target, None)
    return node.target if node.op == "call_function" else None


def _ancestors(node: fx.Node, memo: dict) -> frozenset:
    """Placeholders and attributes (by name) that ``node`` is computed from."""
    if node in memo:
        return memo[node]
    found: set = set()
    if node.op == "placeholder":
        found.add(("input", node.target))
    elif node.op == "get_attr":
        found.add(("attr", node.target))
    for arg in node.all_input_nodes:
        found |= _ancestors(arg, memo)
    memo[node] = frozenset(found)
    return memo[node]


def _float_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module._parameters.items() if p is not None and p.is_floating_point()}


def calls_round_or_clamp(graph: fx.Graph) -> bool:
    return any(_target_of(n) in _ROUND | _CLAMP for n in graph.nodes)


def lsq_roles(module: nn.Module, graph: fx.Graph) -> tuple[str | None, str | None, str]:
    """(step name, offset name or None, why not) from the graph: the step divides the input (``x / s``, or
    multiplies it by ``1/s``), the offset is what the dividend holds besides the input."""
    if not any(_target_of(n) in _ROUND for n in graph.nodes):
        return None, None, "its forward does not round"
    params = _float_params(module)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if not inputs:
        return None, None, "its forward takes no input"
    x = ("input", inputs[0].target)
    memo: dict = {}
    for node in graph.nodes:
        target = _target_of(node)
        if target in _DIV and len(node.args) == 2:
            num, den = node.args
        elif target in _MUL and len(node.args) == 2 and _is_reciprocal(node.args[1]):
            num, den = node.args[0], node.args[1]
        else:
            continue
        if not (isinstance(num, fx.Node) and isinstance(den, fx.Node)) or x not in _ancestors(num, memo):
            continue
        steps = {a for kind, a in _ancestors(den, memo) if kind == "attr" and a in params}
        offsets = {a for kind, a in _ancestors(num, memo) if kind == "attr" and a in params} - steps
        if len(steps) != 1 or len(offsets) > 1:
            return None, None, f"cannot tell the step among the parameters {sorted(steps | offsets)}"
        return steps.pop(), (offsets.pop() if offsets else None), ""
    return None, None, "no division of the input by a parameter (x / s) in its forward"


def _is_reciprocal(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    target = _target_of(node)
    if target in (torch.reciprocal, torch.Tensor.reciprocal):
        return True
    return target in _DIV and isinstance(node.args[0], (int, float)) and node.args[0] == 1


def roles_by_name(module: nn.Module) -> tuple[str | None, str | None, str]:
    """For modules fx cannot trace: the step is the one parameter named like a step; a second float parameter of
    the same size, if any, is the offset. The probes then decide whether the module behaves as LSQ."""
    params = _float_params(module)
    steps = [n for n in params if n.lower() in STEP_NAMES]
    if len(steps) != 1:
        return None, None, "no single parameter named like a step (" + "/".join(STEP_NAMES[:5]) + ")"
    others = [n for n in params if n != steps[0]]
    if len(others) > 1 or (others and params[others[0]].numel() not in (1, params[steps[0]].numel())):
        return None, None, f"parameters besides the step: {others}"
    return steps[0], (others[0] if others else None), ""


# ---------------------------------------------------------------------------------------------------------------
# Probing: read range, axis and gradient scale from behaviour, then check the fused module against the original
# ---------------------------------------------------------------------------------------------------------------


class _Restored:
    """Runs user code on probes without leaving a trace: parameter/buffer values, attributes and the registered
    objects of every submodule come back as they were (some quantizers initialise on their first call)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.saved = []
        for m in self.module.modules():
            tensors = {**m._parameters, **m._buffers}
            values = {k: t.detach().clone() for k, t in tensors.items() if t is not None}
            self.saved.append((m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules), values))
        return self

    def __exit__(self, *exc):
        for m, attrs, params, buffers, modules, values in self.saved:
            vars(m).update(attrs)
            m._parameters.clear(), m._parameters.update(params)
            m._buffers.clear(), m._buffers.update(buffers)
            m._modules.clear(), m._modules.update(modules)
            with torch.no_grad():
                for k, t in {**params, **buffers}.items():
                    if t is not None and k in values:
                        t.copy_(values[k])
        return False


def _run(module: nn.Module, x: torch.Tensor, wrt: list[torch.Tensor], upstream: torch.Tensor | None):
    """Output of ``module(x)`` and, with ``upstream``, the gradients of ``wrt`` (None where unused), computed with
    ``torch.autograd.grad`` so that no ``.grad`` of the user's parameters changes."""
    with _Restored(module), torch.enable_grad():
        y = module(x)
        if upstream is None:
            return y.detach(), None
        leaves = [t for t in wrt if t.requires_grad]
        grads = torch.autograd.grad(y, leaves, upstream, allow_unused=True)
    found = dict(zip(map(id, leaves), grads, strict=True))
    return y.detach(), [found.get(id(t)) for t in wrt]


def _per_channel(t: torch.Tensor, shape: tuple[int, ...], axis: int | None) -> torch.Tensor:
    """A step/offset tensor as a float64 tensor that broadcasts over x of ``shape``."""
    t = t.detach().double().reshape(-1)
    if axis is None:
        return t.reshape([1] * len(shape))
    view = [1] * len(shape)
    view[axis] = -1
    return t.reshape(view)


def _probe_x(step, offset, shape, axis, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    v = torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    x = v * _per_channel(step, shape, axis)
    if offset is not None:
        x = x + _per_channel(offset, shape, axis)
    return x.float()


def _probe_layouts(module: nn.Module, step: torch.Tensor, seen_shape) -> list[tuple[tuple[int, ...], int | None]]:
    """Candidate (input shape, channel axis) pairs to probe with: the recorded input shape when an example input
    was given, else shapes the step broadcasts over (keepdim steps name their axis; a 1-D step may be meant
    along the first or the last axis)."""
    channels = step.numel()
    if seen_shape is not None:
        shape = _small(tuple(seen_shape), channels)
        if channels == 1:
            return [(shape, None)]
        return [(shape, d) for d, n in enumerate(shape) if n == channels]
    if channels == 1:
        return [((6, 8, 5, 5), None)]
    big = [d for d, n in enumerate(step.shape) if n != 1]
    if step.dim() >= 2 and len(big) == 1:
        return [(tuple(n if n != 1 else 4 for n in step.shape), big[0])]
    return [((channels, 16), 0), ((16, channels), 1)]


def _small(shape: tuple[int, ...], channels: int, limit: int = 4096) -> tuple[int, ...]:
    """``shape`` with its largest non-channel dimensions halved until it has at most ``limit`` elements: the probes
    need the layout, not the size of a real batch."""
    shape = list(shape)
    while math.prod(shape) > limit:
        free = [d for d, n in enumerate(shape) if n > 1 and (channels == 1 or n != channels)]
        if not free:
            break
        d = max(free, key=lambda i: shape[i])
        shape[d] = (shape[d] + 1) // 2
    return tuple(shape)


def _grown(shape: tuple[int, ...], axis: int | None, factor: int) -> tuple[int, ...] | None:
    """``shape`` with one non-channel dimension ``factor`` times larger (None for a 1-D per-channel input)."""
    dims = [d for d in range(len(shape)) if d != axis]
    if not dims:
        return None
    d = dims[0]
    return shape[:d] + (shape[d] * factor,) + shape[d + 1 :]


def _read_range(module, step, offset, shape, axis, gen) -> tuple[tuple[int, bool] | None, str]:
    x = _probe_x(step, offset, shape, axis, -300.0, 300.0, gen)
    y, _ = _run(module, x, [], None)
    if y.shape != x.shape or not torch.isfinite(y).all():
        return None, "its output is not an elementwise function of its input"
    q = (y.double() - (0 if offset is None else _per_channel(offset, shape, axis))) / _per_channel(step, shape, axis)
    if (q - q.round()).abs().max() > 1e-3:
        return None, "its outputs are not integer multiples of the step"
    qmin, qmax = int(q.min().round()), int(q.max().round())
    mapped = bits_for_range(qmin, qmax)
    if mapped is None:
        return None, f"range [{qmin}, {qmax}] is no 2..8-bit signed/unsigned range of SPEC section 1"
    return mapped, ""


def _near_tie_or_edge(x, step, offset, shape, axis, qmin, qmax) -> torch.Tensor:
    """Elements whose ``v`` sits so close to a rounding tie or a clamp edge that an ulp moves them."""
    v = x.double() - (0 if offset is None else _per_channel(offset, shape, axis))
    v = v / _per_channel(step, shape, axis)
    tol = NEAR_TIE * v.abs().clamp_min(1.0)
    tie = (v - v.floor() - 0.5).abs() < tol
    edge = ((v - qmin).abs() < tol) | ((v - qmax).abs() < tol)
    return tie | edge


def _unit_grads(x, step, offset, fit: LSQFit, upstream):
    """Step/offset gradients of SPEC section 1 with grad scale 1 (what the user's scale multiplies)."""
    xs = x.detach()
    s = step.detach().clone().requires_grad_(True)
    b = None if offset is None else offset.detach().clone().requires_grad_(True)
    y = fake_quant(xs, s, fit.bits, signed=fit.signed, offset=b, axis=fit.axis, grad_scale=1.0)
    grads = torch.autograd.grad(y, [s] + ([b] if b is not None else []), upstream)
    return torch.cat([g.reshape(-1).double() for g in grads])


def _user_param_grads(module, x, step, offset, upstream):
    _, grads = _run(module, x, [step] + ([offset] if offset is not None else []), upstream)
    if any(g is None for g in grads):
        return None
    return torch.cat([g.reshape(-1).double() for g in grads])


def _gs_ratio(module, fit, step, offset, shape, gen) -> float | None:
    qmin, qmax = quant_range(fit.bits, fit.signed)
    x = _probe_x(step, offset, shape, fit.axis, qmin - 3.0, qmax + 3.0, gen)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64).float()
    upstream[_near_tie_or_edge(x, step, offset, shape, fit.axis, qmin, qmax)] = 0
    user = _user_param_grads(module, x, step, offset, upstream)
    unit = _unit_grads(x, step, offset, fit, upstream)
    if user is None or float(unit.square().sum()) == 0.0:
        return None
    return float((user * unit).sum() / unit.square().sum())


def _read_grad_scale(module, fit: LSQFit, step, offset, shape, gen) -> tuple[tuple[float, float] | None, str]:
    """(c, p) with the user's step-gradient scale ``c * numel(x) ** p``, p in {0, -1/2, -1}, from two sizes."""
    if not step.requires_grad:
        return (1.0, 0.0), ""
    r1 = _gs_ratio(module, fit, step, offset, shape, gen)
    if r1 is None or not r1 > 0:
        return None, "no gradient reaches its step"
    bigger = _grown(shape, fit.axis, 4)
    if bigger is None:
        return (r1, 0.0), ""
    r2 = _gs_ratio(module, fit, step, offset, bigger, gen)
    if r2 is None or not r2 > 0:
        return None, "no gradient reaches its step"
    power = math.log(r2 / r1) / math.log(4)
    snapped = min((0.0, -0.5, -1.0), key=lambda p: abs(p - power))
    if abs(power - snapped) > 0.02:
        return None, f"its step gradient is not LSQ's times c * numel(x)^p, p in 0, -1/2, -1 (measured p={power:.3f})"
    return (_snapped_coef(r1 / math.prod(shape) ** snapped, snapped, fit, step.numel()), snapped), ""


def _snapped_coef(coef: float, power: float, fit: LSQFit, channels: int) -> float:
    """The exact constant the user's code most likely wrote, when the measured one is within 1e-5 of it: 1, 1/Qp or
    channels/Qp under the power of the measured law (lsq-net: 1/sqrt(Qp*numel); per channel: 1/sqrt(Qp*numel/C))."""
    qp = quant_range(fit.bits, fit.signed)[1]
    for base in (1.0, 1.0 / qp, channels / qp):
        exact = base**-power if power else base
        if abs(coef / exact - 1) < 1e-5:
            return exact
    return coef


def _compare(original, fused, fit: LSQFit, step, offset, shape, gen) -> tuple[str | None, bool]:
    """(why they differ or None, forward values bit for bit?) on a probe batch over the range and 3 steps beyond.

    Tolerances: values within VALUE_RTOL of |y| + s, or one step where v is within NEAR_TIE of a rounding tie or
    a clamp edge; x gradients within VALUE_RTOL (``(g * s) / s`` in the user's autograd); step and offset
    gradients within GRAD_RTOL of the sum of the magnitudes of their terms.
    """
    qmin, qmax = quant_range(fit.bits, fit.signed)
    x = _probe_x(step, offset, shape, fit.axis, qmin - 3.0, qmax + 3.0, gen)
    near = _near_tie_or_edge(x, step, offset, shape, fit.axis, qmin, qmax)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64).float()
    upstream[near] = 0  # gradients compared where both formulas see the same rounding
    wrt = [t for t in (step, offset) if t is not None]
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, ga = _run(original, xa, [xa, *wrt], upstream)
    yb, gb = _run(fused, xb, [xb, *wrt], upstream)
    s = _per_channel(step, shape, fit.axis).float().expand(shape)
    diff = (ya - yb).abs()
    value_tol = VALUE_RTOL * (ya.abs() + s)
    far = diff > value_tol
    if (far & ~near).any() or (diff[near] > s[near] * (1 + 1e-6) + value_tol[near]).any():
        return f"forward values differ (max {float(diff.max()):.3g}) beyond the tolerance", False
    if ga[0] is None or (ga[0] - gb[0]).abs().gt(VALUE_RTOL * upstream.abs() + 1e-30).any():
        return "gradients of x differ", False
    bounds = _term_magnitudes(x, step, offset, fit, upstream)
    for name, t, g_user, g_fused, bound in zip(("step", "offset"), wrt, ga[1:], gb[1:], bounds, strict=False):
        if not t.requires_grad:
            continue
        if g_user is None or ((g_user - g_fused).double().reshape(-1).abs() > GRAD_RTOL * bound + 1e-12).any():
            return f"gradients of the {name} differ", False
    return None, torch.equal(ya, yb)


def _term_magnitudes(x, step, offset, fit: LSQFit, upstream) -> list[torch.Tensor]:
    """Per step (and offset) element: grad scale * sum |g * dQ/ds| (|g * dQ/dbeta|), the size of the terms their
    gradients add up; the reduction order may move a gradient by a small fraction of it."""
    shape, axis = tuple(x.shape), fit.axis
    qmin, qmax = quant_range(fit.bits, fit.signed)
    v = x.double() - (0 if offset is None else _per_channel(offset, shape, axis))
    v = v / _per_channel(step, shape, axis)
    inside = (v >= qmin) & (v <= qmax)
    d_step = torch.where(inside, v.round().clamp(qmin, qmax) - v, v.clamp(qmin, qmax)).abs()
    g = upstream.double().abs() * _gs_at(fit, x)
    bounds = [_channel_sums(g * d_step, axis, step.numel())]
    if offset is not None:
        bounds.append(_channel_sums(g * (~inside), axis, offset.numel()))
    return bounds


def _channel_sums(t: torch.Tensor, axis: int | None, n: int) -> torch.Tensor:
    if n == 1:
        return t.sum().reshape(1)
    return t.movedim(axis, 0).reshape(n, -1).sum(1)


def _gs_at(fit: LSQFit, x: torch.Tensor) -> float:
    return fit.gs_coef * x.numel() ** fit.gs_power if fit.gs_power else fit.gs_coef


def fit_lsq(module: nn.Module, step_name: str, offset_name: str | None, seen_shape=None):
    """Fits SPEC section 1's quantizer to ``module`` and checks it: (FusedLSQ, note) or (None, why not)."""
    step = module._parameters[step_name]
    offset = module._parameters[offset_name] if offset_name else None
    if offset is not None and offset.numel() not in (1, step.numel()):
        return None, f"offset {offset_name} has {offset.numel()} elements, the step {step.numel()}"
    if not bool(torch.all(torch.isfinite(step) & (step > 0))):
        return None, f"its step {step_name} is not positive (initialise it first: run one batch)"
    others = [n for n, p in _float_params(module).items() if n not in (step_name, offset_name) and p.requires_grad]
    if others:
        return None, f"it has learnable parameters besides the step and offset: {others}"
    why = "no input shape the step broadcasts over"
    for shape, axis in _probe_layouts(module, step, seen_shape):
        gen = torch.Generator().manual_seed(0)
        try:
            fused, note, why = _fit_layout(module, step_name, offset_name, step, offset, shape, axis, gen)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            fused, why = None, f"probe input of shape {list(shape)} failed: {type(e).__name__}: {str(e)[:80]}"
        if fused is not None:
            return fused, note
    return None, why


def _fit_layout(module, step_name, offset_name, step, offset, shape, axis, gen):
    mapped, why = _read_range(module, step, offset, shape, axis, gen)
    if mapped is None:
        return None, "", why
    draft = LSQFit(step_name, offset_name, *mapped, axis, 1.0, 0.0)
    law, why = _read_grad_scale(module, draft, step, offset, shape, gen)
    if law is None:
        return None, "", why
    fit = LSQFit(step_name, offset_name, *mapped, axis, *law)
    fused = FusedLSQ(module, fit)
    exact = True
    for probe in filter(None, (shape, _grown(shape, axis, 3))):
        why, same = _compare(module, fused, fit, step, offset, probe, gen)
        if why:
            return None, "", f"{why} ({fit.describe()})"
        exact &= same
    values = "bit for bit" if exact else f"within rtol {VALUE_RTOL:.1e} (one step at rounding ties)"
    check = f"values {values}, gradients of x, step, offset within the stated tolerance"
    return fused, f"{fit.describe()}; probe check: {check}", ""


# ---------------------------------------------------------------------------------------------------------------
# Registered conversions: a generic probe check
# ---------------------------------------------------------------------------------------------------------------


def check_registered(original: nn.Module, fused: nn.Module, seen_shape=None) -> str | None:
    """Why ``fused`` does not stand in for ``original`` on a probe batch, or None.

    Without knowing the formula the check is statistical: outputs and x-gradients agree within 1e-5 of their
    largest magnitude on all but 1% of the elements (elements at rounding ties may round apart), and the
    gradients of parameters with the same name within rtol 1e-3.
    """
    params = _float_params(original)
    magnitude = min((float(p.detach().abs().mean()) for p in params.values()), default=1.0) or 1.0
    step_like = next((p for n, p in params.items() if n.lower() in STEP_NAMES), torch.ones(1))
    fused_params = dict(fused.named_parameters())
    names = [n for n in params if n in fused_params]
    why = "no probe input shape"
    for shape, _ in _probe_layouts(original, step_like, seen_shape):
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=gen) * 8 * magnitude).requires_grad_(True)
        upstream = torch.randn(shape, generator=gen)
        try:
            ya, ga = _run(original, x, [x] + [params[n] for n in names], upstream)
            yb, gb = _run(fused, x, [x] + [fused_params[n] for n in names], upstream)
        except (RuntimeError, ValueError, TypeError) as e:
            why = f"probe input of shape {list(shape)} failed: {type(e).__name__}: {str(e)[:80]} (pass example_input)"
            continue
        return _registered_differences(ya, ga, yb, gb, names)
    return why


def _registered_differences(ya, ga, yb, gb, names) -> str | None:
    for what, a, b in (("forward values", ya, yb), ("gradients of x", ga[0], gb[0])):
        if a is None or b is None or a.shape != b.shape:
            return f"{what} differ"
        off = (a - b).abs() > 1e-5 * max(float(a.abs().max()), 1e-12)
        if off.float().mean() > 0.01:
            return f"{what} differ on {float(off.float().mean()):.1%} of the probe elements"
    for name, a, b in zip(names, ga[1:], gb[1:], strict=True):
        if (a is None) != (b is None) or (a is not None and not torch.allclose(a, b, rtol=1e-3, atol=1e-6)):
            return f"gradients of {name} differ"
    return None


# ---------------------------------------------------------------------------------------------------------------
# swap_fused
# ---------------------------------------------------------------------------------------------------------------


def _input_shapes(model: nn.Module, example_input) -> dict[str, tuple[int, ...]]:
    """The first input shape each submodule sees on ``example_input`` (model state restored afterwards)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():

        def hook(mod, args, name=name):
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape))

        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with _Restored(model), torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _is_library_module(module: nn.Module) -> bool:
    """torch's and lowbit's own modules are never user quantizers (torch.ao ones are mapped separately)."""
    return type(module).__module__.startswith(("torch.", "lowbit."))


def _try_pattern(module: nn.Module, seen_shape) -> tuple[nn.Module | None, str, bool]:
    """(fused module, note or why not, looks like a quantizer) for a module of user code."""
    graph, trace_error = trace_own_code(module)
    params = _float_params(module)
    step_like = [n for n in params if n.lower() in STEP_NAMES]
    if graph is not None:
        looks = bool(params) and calls_round_or_clamp(graph)
        step_name, offset_name, why = lsq_roles(module, graph)
    else:
        looks = bool(step_like)
        step_name, offset_name, why = roles_by_name(module)
        why = f"{trace_error}; {why}" if step_name is None else why
    looks = looks or (bool(step_like) and _inside_layer_wrapper(module))
    if not looks or step_name is None:
        return None, why, looks
    fused, note = fit_lsq(module, step_name, offset_name, seen_shape)
    if fused is not None and graph is None:
        note += f" (matched by behaviour alone; {trace_error})"
    if fused is not None and set(fused.state_dict()) != set(module.state_dict()):
        return None, "its state_dict keys would change", True
    return fused, note, True


def _inside_layer_wrapper(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear, nn.Conv1d, nn.Conv3d)) or "weight" in module._parameters


def _replacement(module: nn.Module, seen_shape) -> tuple[nn.Module | None, str, bool]:
    """(fused module, note or why not, whether a kept module belongs in the report)."""
    to_fused = _registered(module)
    if to_fused is not None:
        fused = to_fused(module)
        if not isinstance(fused, nn.Module):
            return None, f"register_fake_quant's to_fused returned {type(fused).__name__}, not a module", True
        why = check_registered(module, fused, seen_shape)
        return (None, why, True) if why else (fused, "registered; probe check passed", True)
    fused, why = _ao_replacement(module)
    if fused is not None or why:
        return fused, why, True
    if _is_library_module(module):
        return None, "", False
    return _try_pattern(module, seen_shape)


def swap_fused(model: nn.Module, example_input=None) -> SwapReport:
    """Replaces, in place, the slow fake-quant modules of ``model`` by fused lowbit ones and reports them.

    Swapped: classes given to ``register_fake_quant`` (``lowbit.nn.ReferenceLSQ`` is registered), torch.ao
    ``FakeQuantize`` / ``_LearnableFakeQuantize``, and any module whose own forward computes LSQ / LSQ+ fake
    quantization (``round(clamp(x / s, Qn, Qp)) * s`` with straight-through rounding, written any of the usual
    ways), per-tensor or per-channel. Each swap of the last two kinds is checked on probe batches first.

    Args:
        model: the model, changed in place.
        example_input: optional input of ``model`` (a tensor or a tuple of arguments). One forward pass (model
            state restored) records the input shape of each quantizer, which its probe batches then take;
            without it the shape comes from the step's shape.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_input is not None and not isinstance(example_input, (torch.Tensor, tuple)):
        raise TypeError(f"example_input must be a tensor or a tuple of arguments, got {type(example_input).__name__}")
    shapes = _input_shapes(model, example_input) if example_input is not None else {}
    report = SwapReport()
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(d + ".") for d in done) or isinstance(module, (FusedLSQ, FusedFakeQuantize)):
            continue
        fused, note, report_it = _replacement(module, shapes.get(name))
        if fused is not None:
            model.set_submodule(name, fused)
            done.append(name)
            report.swapped.append((name, type(module).__name__, type(fused).__name__))
            if note:
                report.notes[name] = note
        elif report_it and note:
            report.kept.append((name, type(module).__name__, note))
    return report


def _reference_lsq_to_fused(module: nn.Module) -> nn.Module:
    from lowbit.nn.quantizers import LSQQuantizer

    fused = LSQQuantizer(
        module.bits,
        signed=module.signed,
        channels=None if module.axis is None else module.step.numel(),
        axis=module.axis or 0,
    )
    with torch.no_grad():
        fused.step.copy_(module.step)
    fused.initialized = True
    return fused.to(module.step.device)


def _register_builtins() -> None:
    from lowbit.nn.reference_lsq import ReferenceLSQ

    register_fake_quant(ReferenceLSQ, _reference_lsq_to_fused)


_register_builtins()
