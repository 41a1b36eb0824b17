"""The folded activation clip: ``lowbit.fake_quant(..., clip=)`` on every backend against the NumPy reference of
hardtanh followed by LSQ, and ``lowbit.fold_activation_clips`` on the packaged models (same values and gradients
as the unfolded model, what it folds and what it leaves alone, convert, state dicts)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import reference as ref
import torch
from conftest import DEVICE
from test_fake_quant import DTYPES, close_sum
from torch import nn

import lowbit
from lowbit.models import create_model
from lowbit.nn import FoldedClip, LSQQuantizer, MultiBranchQuantizer, QConv2d

CLIPS = [(0.0, 6.0), (0.0, math.inf), (-1.5, 2.25)]
EDGES = [0.0, -0.0, 6.0, -1.5, 2.25, 5.999, 6.001, -1e-30, 1e-30, math.nan, math.inf, -math.inf]


def _reference(x, step, bits, signed, clip, offset, axis, grad):
    """NumPy: LSQ of hardtanh(x) (tests/reference.py), dx zero outside hardtanh's open interval."""
    lo, hi = clip
    xs = ref.as_np(x)
    with np.errstate(invalid="ignore"):
        clipped = torch.from_numpy(np.clip(xs, lo, hi)).to(x.dtype)  # exact in x's dtype: the bounds are
        want = ref.fake_quant(clipped, step, bits, signed, offset=offset, axis=axis, grad=grad)
        passes = (xs > lo) & (xs < hi)
    want.dx = np.where(passes, want.dx, 0.0)
    return want


@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape, axis, signed, with_offset", [
    ((3, 5, 7, 11), None, False, False),
    ((1023,), None, True, True),
    ((2, 9, 13), 1, True, False),
    ((6, 37), 0, False, True),
])  # fmt: skip
def test_clip_matches_hardtanh_then_lsq(backend, clip, dtype, shape, axis, signed, with_offset):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=gen) * 4).to(dtype)
    x.view(-1)[: len(EDGES)] = torch.tensor(EDGES).to(dtype)
    channels = shape[axis] if axis is not None else 1
    step = (0.2 + 0.3 * torch.rand(channels, generator=gen)).to(DEVICE).requires_grad_(True)
    offset = (0.1 * torch.randn(channels, generator=gen)).to(DEVICE).requires_grad_(True) if with_offset else None
    grad = torch.randn(shape, generator=gen).to(dtype)
    x = x.to(DEVICE).requires_grad_(True)
    y = lowbit.fake_quant(x, step, 4, signed=signed, offset=offset, axis=axis, clip=clip)
    y.backward(grad.to(DEVICE))

    want = _reference(x, step, 4, signed, clip, offset, axis, grad)
    torch.testing.assert_close(y.cpu(), ref.to_dtype(want.y, dtype), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x.grad.cpu(), ref.to_dtype(want.dx, dtype), rtol=0, atol=0, equal_nan=True)
    close_sum(step.grad, want.dstep, want.dstep_scale, "dstep")
    if offset is not None:
        close_sum(offset.grad, want.doffset, want.doffset_scale, "doffset")


def test_clip_equals_the_unfolded_composition_bit_for_bit(backend):
    """The fused clip and nn.ReLU6 + the op give the same bits, gradients included (same backend, same sums)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 9, 9, generator=gen) * 4
    x.view(-1)[: len(EDGES)] = torch.tensor(EDGES)
    g = torch.randn(x.shape, generator=gen)
    outs = []
    for folded in (True, False):
        xi = x.clone().to(DEVICE).requires_grad_(True)
        step = torch.tensor([0.3], device=DEVICE, requires_grad=True)
        xq = xi if folded else nn.functional.relu6(xi)
        y = lowbit.fake_quant(xq, step, 4, clip=(0.0, 6.0) if folded else None)
        y.backward(g.to(DEVICE))
        outs.append((y.detach(), xi.grad, step.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "clip, error",
    [((0.0,), TypeError), (6.0, TypeError), ((0.0, "6"), TypeError), ((True, 6.0), TypeError),
     ((6.0, 0.0), ValueError), ((1.0, 1.0), ValueError), ((math.nan, 6.0), ValueError)],
)  # fmt: skip
def test_bad_clip_is_rejected_naming_it(clip, error):
    with pytest.raises(error, match="clip"):
        lowbit.fake_quant(torch.randn(4), torch.tensor([0.1]), 4, clip=clip)


# ---- fold_activation_clips on models ------------------------------------------------------------------------


def _pair(arch: str, **quant):
    torch.manual_seed(0)
    fp = create_model(arch, num_classes=10, small_input=True)
    quant = quant or {"a_bits": 4}
    unfolded = lowbit.quantize(copy.deepcopy(fp), 4, fold_clips=False, **quant)
    return unfolded, lowbit.quantize(copy.deepcopy(fp), 4, **quant)


def _train_step(model, x, y, seed):
    torch.manual_seed(seed)  # the same dropout masks for both models
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize(
    "arch, folds, quant",
    [("mobilenet_v2", 34, {}), ("resnet18", 8, {}), ("mobilenet_v2", 34, {"multi_branch": (2, 4, 8)})],
    ids=["mobilenet_v2", "resnet18", "mobilenet_v2-metamix"],
)
def test_folded_model_trains_exactly_like_the_unfolded_one(arch, folds, quant):
    unfolded, folded = _pair(arch, **quant)
    assert sum(isinstance(m, FoldedClip) for m in folded.modules()) == folds
    assert not any(isinstance(m, FoldedClip) for m in unfolded.modules())
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    for seed in (1, 2):  # the first step also initialises the steps and the signedness from the clipped values
        assert torch.equal(_train_step(unfolded, x, y, seed), _train_step(folded, x, y, seed))
    grads = dict(unfolded.named_parameters())
    for name, p in folded.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name
    quantizers = (LSQQuantizer, MultiBranchQuantizer)
    signs = [m.signed for m in unfolded.modules() if isinstance(m, quantizers)]
    assert signs == [m.signed for m in folded.modules() if isinstance(m, quantizers)]
    assert folded.state_dict().keys() == unfolded.state_dict().keys()


def test_fold_is_idempotent_and_unfold_restores_the_activations():
    _, folded = _pair("mobilenet_v2")
    assert lowbit.fold_activation_clips(folded) == []
    assert lowbit.unfold_activation_clips(folded) == 34
    assert sum(isinstance(m, nn.ReLU6) for m in folded.modules()) == 35
    assert all(m.input_clip is None for m in folded.modules() if isinstance(m, LSQQuantizer))
    assert len(lowbit.fold_activation_clips(folded)) == 34


def test_convert_of_a_folded_model_equals_convert_of_the_unfolded_one():
    unfolded, folded = _pair("mobilenet_v2")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        unfolded(x), folded(x)  # step initialisation
    a, b = lowbit.convert(unfolded.eval()), lowbit.convert(folded.eval())
    assert not any(isinstance(m, FoldedClip) for m in b.modules())
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert any(isinstance(m, FoldedClip) for m in folded.modules())  # convert worked on a copy


class _TwoReaders(nn.Module):
    """ReLU6 read twice; an in-place ReLU whose input is read again; a multi-branch (MetaMix) reader and a plain
    one, both foldable."""

    def __init__(self):
        super().__init__()
        self.act_shared, self.act_inplace = nn.ReLU6(), nn.ReLU(inplace=True)
        self.act_mb, self.act_ok = nn.ReLU(), nn.ReLU6()
        self.a, self.b = QConv2d(4, 4, 1), QConv2d(4, 4, 1)
        self.c = QConv2d(4, 4, 1)
        self.mb = lowbit.nn.MultiBranchQConv2d(4, 4, 1)
        self.d = QConv2d(4, 4, 1)

    def forward(self, x):
        h = self.act_shared(x)
        x = self.a(h) + self.b(h)
        t = x * 1.0
        u = self.act_inplace(t)
        x = self.c(u) + t
        x = self.mb(self.act_mb(x))
        return self.d(self.act_ok(x))


def test_fold_leaves_shared_and_inplace_readers_alone_and_folds_multi_branch_ones():
    model = _TwoReaders()
    assert lowbit.fold_activation_clips(model) == [("act_mb", "mb"), ("act_ok", "d")]
    assert model.d.act_quant.input_clip == (0.0, 6.0) and model.mb.act_quant.input_clip == (0.0, math.inf)
    assert isinstance(model.act_shared, nn.ReLU6) and isinstance(model.act_inplace, nn.ReLU)
    assert lowbit.unfold_activation_clips(model) == 2 and model.mb.act_quant.input_clip is None


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.act, self.conv = nn.ReLU6(), QConv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x + 1
        return self.conv(self.act(x))


def test_untraceable_model_raises_when_strict_and_stays_unfolded_otherwise():
    model = _Untraceable()
    with pytest.raises(ValueError, match="fold_activation_clips"):
        lowbit.fold_activation_clips(model)
    assert lowbit.fold_activation_clips(model, strict=False) == []
    assert isinstance(model.act, nn.ReLU6)
    with pytest.raises(TypeError, match="model"):
        lowbit.fold_activation_clips("model")
    with pytest.raises(TypeError, match="strict"):
        lowbit.fold_activation_clips(model, strict=1)
    with pytest.raises(TypeError, match="fold_clips"):
        lowbit.quantize(nn.Sequential(nn.Conv2d(3, 3, 1)), fold_clips=None)


def test_folded_state_dict_loads_into_an_unfolded_model_with_the_same_result():
    unfolded, folded = _pair("resnet18")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        folded(x)
        unfolded.load_state_dict(folded.state_dict())
        assert torch.equal(unfolded.eval()(x), folded.eval()(x))


def test_surgery_after_folding_keeps_the_activation():
    """Replacing a reading layer's quantizer, or the layer, after folding: the FoldedClip clips again itself."""
    unfolded, folded = _pair("mobilenet_v2")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        unfolded(x), folded(x)
    readers = [name for name, m in folded.named_modules() if isinstance(m, QConv2d) and m.act_quant.input_clip]
    first, second = readers[0], readers[1]
    for model in (unfolded, folded):
        model.get_submodule(first).act_quant = nn.Identity()
        layer = model.get_submodule(second)
        fresh = copy.deepcopy(layer)
        fresh.act_quant.input_clip = None
        model.set_submodule(second, fresh)
    with torch.no_grad():
        assert torch.equal(unfolded.eval()(x), folded.eval()(x))
    clips = [m for m in folded.modules() if isinstance(m, FoldedClip)]
    assert sum(not m.clipped_by_reader() for m in clips) == 2
