"""Reference models for quantization experiments, in plain PyTorch (no torchvision needed).

Every conv / linear layer is a plain ``nn.Conv2d`` / ``nn.Linear`` and every activation is its own module, so
quantizers can swap layers by type and see what precedes each one. ``small_input=True`` adapts the ImageNet models
to 8x8..32x32 images (total stride 8 instead of 32).
"""

from __future__ import annotations

from torch import nn

from lowbit.models.mobilenet_v2 import MobileNetV2
from lowbit.models.mobilenet_v3 import MobileNetV3Small
from lowbit.models.resnet import ResNet18
from lowbit.models.small_cnn import SmallCNN

MODELS: dict[str, type[nn.Module]] = {
    "mobilenet_v2": MobileNetV2,
    "mobilenet_v3_small": MobileNetV3Small,
    "resnet18": ResNet18,
    "small_cnn": SmallCNN,
}

# Models with a torchvision counterpart; the names are the same as torchvision.models' builders.
_TORCHVISION_NAMES = ("mobilenet_v2", "mobilenet_v3_small", "resnet18")


# Attribute on a model built by ``create_model``: {"name": ..., "kwargs": {...}}, what ``lowbit.save`` records so
# that ``lowbit.load`` can rebuild the architecture without being handed a skeleton.
ARCH_ATTR = "lowbit_arch"


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the model registered as ``name`` in ``MODELS``, passing ``kwargs`` to its constructor.

    The name and kwargs are recorded on the model as ``model.lowbit_arch`` (survives ``copy.deepcopy``,
    ``lowbit.quantize`` and ``lowbit.convert``), so ``lowbit.save`` / ``lowbit.load`` can rebuild it.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    model = MODELS[name](**kwargs)
    setattr(model, ARCH_ATTR, {"name": name, "kwargs": dict(kwargs)})
    return model


def from_torchvision(name: str, **kwargs) -> nn.Module:
    """Builds torchvision's version of model ``name`` (e.g. ``weights="DEFAULT"`` for pretrained weights).

    torchvision is imported only here; raises ``ImportError`` if it is missing or fails to import.
    """
    if name not in _TORCHVISION_NAMES:
        raise ValueError(f"no torchvision counterpart for {name!r}; valid names: {', '.join(_TORCHVISION_NAMES)}")
    try:
        import torchvision.models
    except Exception as exc:  # a torchvision built for another torch raises RuntimeError, not ImportError
        raise ImportError(
            f"from_torchvision({name!r}) needs torchvision, which could not be imported ({type(exc).__name__}: {exc}); "
            f"use create_model({name!r}) for the plain-PyTorch version"
        ) from exc
    return getattr(torchvision.models, name)(**kwargs)


__all__ = ["MODELS", "MobileNetV2", "MobileNetV3Small", "ResNet18", "SmallCNN", "create_model", "from_torchvision"]
