"""Packaged models (lowbit.models): shapes, gradients, width scaling, published sizes, the registry."""

from __future__ import annotations

import operator
import sys

import pytest
import torch
from torch import nn

from lowbit.models import MODELS, MobileNetV2, MobileNetV3Small, ResNet18, SmallCNN, create_model, from_torchvision

IMAGENET_MODELS = ["mobilenet_v2", "mobilenet_v3_small", "resnet18"]

# (model, kwargs, input size, spatial size of the last feature map)
CASES = [(name, {"small_input": False}, 64, 2) for name in IMAGENET_MODELS]
CASES += [(name, {"small_input": True}, size, size // 8) for name in IMAGENET_MODELS for size in (8, 32)]
CASES += [("small_cnn", {}, 8, 4)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name,kwargs,size,feature_size", CASES, ids=lambda v: str(v))
def test_forward_backward(name, kwargs, size, feature_size):
    in_channels = 1 if name == "small_cnn" else 3
    if name != "small_cnn":
        kwargs = {**kwargs, "width_mult": 0.5}  # keeps the file fast; full width is covered by the size tests
    model = create_model(name, num_classes=7, in_channels=in_channels, **kwargs)
    seen = []
    model.avgpool.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-2:]))
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert seen == [(feature_size, feature_size)]
    out.square().mean().backward()
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            assert mod.weight.grad is not None and torch.isfinite(mod.weight.grad).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_in_channels_one(name):
    kwargs = {} if name == "small_cnn" else {"small_input": True, "width_mult": 0.5}
    model = create_model(name, num_classes=10, in_channels=1, **kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_width_mult_changes_size(name):
    sizes = [n_params(create_model(name, num_classes=10, width_mult=w)) for w in (0.5, 1.0, 1.5)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_small_cnn_width_changes_size():
    assert n_params(SmallCNN(width=16)) < n_params(SmallCNN()) < n_params(SmallCNN(width=64))


# Published sizes (papers / torchvision model cards) and the exact torchvision counts of the same architectures.
@pytest.mark.parametrize(
    "cls,published,exact",
    [(MobileNetV2, 3.50e6, 3_504_872), (MobileNetV3Small, 2.54e6, 2_542_856), (ResNet18, 11.69e6, 11_689_512)],
)
def test_published_parameter_counts(cls, published, exact):
    count = n_params(cls())
    assert abs(count - published) <= 0.01 * published
    assert count == exact
    # The MobileNet small-input variants only change strides; ResNet-18's 3x3 stem replaces the 7x7 one.
    stem_change = 64 * 3 * (7 * 7 - 3 * 3) if cls is ResNet18 else 0
    assert n_params(cls(small_input=True)) == count - stem_change


@pytest.mark.parametrize("name", list(MODELS))
def test_layers_and_activations_are_modules(name):
    """Quantizers swap nn.Conv2d / nn.Linear by type and need every activation as a module of its own."""
    model = create_model(name)
    allowed = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Dropout)
    allowed += (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert all(type(m) in allowed for m in leaves), {type(m).__name__ for m in leaves} - {c.__name__ for c in allowed}
    graph = torch.fx.symbolic_trace(model).graph
    functions = {node.target for node in graph.nodes if node.op in ("call_function", "call_method")}
    assert functions <= {operator.add, operator.mul}  # residual sums and squeeze-excite gating only


def test_create_model_passes_kwargs():
    model = create_model("small_cnn", num_classes=3, width=8)
    assert isinstance(model, SmallCNN) and model.classifier.out_features == 3


def test_create_model_unknown_name():
    with pytest.raises(ValueError, match="resnet50") as info:
        create_model("resnet50")
    assert all(name in str(info.value) for name in MODELS)


def test_from_torchvision_unknown_name():
    with pytest.raises(ValueError, match="small_cnn"):
        from_torchvision("small_cnn")


class _BrokenTorchvision:
    """Meta-path finder making `import torchvision` fail the way a build for another torch does."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_from_torchvision_broken_install_raises_import_error(monkeypatch):
    for mod in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTorchvision(), *sys.meta_path])
    with pytest.raises(ImportError, match="torchvision") as info:
        from_torchvision("resnet18")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_from_torchvision():
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match="torchvision"):
            from_torchvision("mobilenet_v2")
    else:
        model = from_torchvision("resnet18", num_classes=10)
        assert n_params(model) == n_params(ResNet18(num_classes=10))
