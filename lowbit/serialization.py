"""``lowbit.save`` / ``lowbit.load``: a converted model in one safetensors file (format in docs/serialization.md).

The file holds every state-dict tensor (packed weight codes in the canonical layout of SPEC section 4, steps,
biases, BN statistics, ...) and, in the safetensors metadata, the format name and version, how to rebuild the
architecture, each packed layer's configuration and a sha256 checksum over the tensors and the metadata. ``load``
checks all of it before building anything, so a truncated, corrupted or tampered file raises ``ValueError``
saying what is wrong instead of giving a wrong model. (The checksum detects accidents, not forgery: anyone can
recompute it.) ``save`` writes to a temporary file in the target folder, fsyncs it and renames it over the target,
so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable

import torch
from torch import nn

from lowbit.models import ARCH_ATTR, create_model
from lowbit.nn.layers import QConv2d, QLinear
from lowbit.nn.packed import _PackedBase, from_config

FORMAT = "lowbit.packed"
VERSION = 1
REQUIRED_METADATA = ("format", "format_version", "arch", "layers", "checksum")


# ---------------------------------------------------------------------------------------------------------------
# checksum
# ---------------------------------------------------------------------------------------------------------------


def _chunk(digest, data) -> None:
    """Length-prefixed, so that no two different sequences of chunks hash the same byte stream."""
    view = memoryview(data).cast("B")
    digest.update(len(view).to_bytes(8, "little"))
    digest.update(view)


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """``sha256:<hex>`` over the metadata (without ``checksum``, keys sorted, as JSON) and then, in sorted name
    order, each tensor's name, dtype, shape and raw little-endian bytes (as safetensors stores them)."""
    digest = hashlib.sha256()
    _chunk(digest, json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        _chunk(digest, json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        _chunk(digest, tensor.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------------


def _check_path(path, *, must_exist: bool) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if os.path.isdir(path):
        raise ValueError(f"path must be a file, got the directory {path!r}")
    if must_exist and not os.path.exists(path):
        raise FileNotFoundError(f"path {path!r} does not exist")
    folder = os.path.dirname(os.path.abspath(path))
    if not must_exist and not os.path.isdir(folder):
        raise ValueError(f"path {path!r}: its folder {folder!r} does not exist")
    return path


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as detached, contiguous CPU copies (safetensors refuses views that share memory)."""
    unconverted = [n for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))]
    if unconverted:
        raise ValueError(
            f"model has fake-quant layers that were not converted ({', '.join(unconverted[:5])}"
            f"{', ...' if len(unconverted) > 5 else ''}): call lowbit.convert(model) before lowbit.save"
        )
    tensors = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"model's state dict entry {name!r} is a {type(value).__name__}, not a tensor: "
                             "lowbit.save stores tensors only")  # fmt: skip
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def _arch(model: nn.Module) -> dict | None:
    arch = getattr(model, ARCH_ATTR, None)
    if arch is None:
        return None
    try:
        json.dumps(arch)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"model.{ARCH_ATTR} is not JSON-serialisable ({exc}): delete it and pass model= to lowbit.load"
        ) from exc
    return {"builder": "lowbit.models.create_model", **arch}


def _metadata(model: nn.Module) -> dict[str, str]:
    import lowbit

    layers = {name: m.config() for name, m in model.named_modules() if isinstance(m, _PackedBase)}
    cls = type(model)
    return {
        "format": FORMAT,
        "format_version": str(VERSION),
        "lowbit_version": lowbit.__version__,
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "arch": json.dumps(_arch(model)),
        "layers": json.dumps(layers),
    }


_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors byte layout, written here so that the same model always gives the same bytes (the
    safetensors writer orders the metadata at random): 8-byte little-endian header length, the JSON header
    (metadata keys sorted, tensors by descending element size then name, so each is aligned to its size),
    padded with spaces to a multiple of 8, then the tensor bytes back to back."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset, blobs = 0, []
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        tensor = tensors[name]
        if tensor.dtype not in _DTYPES:
            raise ValueError(
                f"model's state dict entry {name!r} has dtype {tensor.dtype}, which safetensors cannot store"
            )
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *blobs])


def _write_atomically(path: str, data: bytes) -> None:
    """Temp file in the target's folder, fsync, ``os.replace``, fsync of the folder: all or nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename durable (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save(model: nn.Module, path) -> None:
    """Writes a converted model to ``path`` (safetensors, format ``lowbit.packed`` version 1), atomically.

    Args:
        model: a model from ``lowbit.convert`` (any ``nn.Module`` whose state dict is all tensors; fake-quant
            layers must be converted first). A model built by ``lowbit.models.create_model`` records how to
            rebuild it; any other model needs ``model=`` at load.
        path: the file to write (its folder must exist); an existing file is replaced only once the new one is
            complete on disk.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = _check_path(path, must_exist=False)
    tensors = _state_tensors(model)
    metadata = _metadata(model)
    metadata["checksum"] = checksum(tensors, metadata)
    _write_atomically(path, _serialize(tensors, metadata))


# ---------------------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------------------


def _header(data: bytes, path: str) -> dict:
    """The safetensors JSON header, parsed by hand so that its metadata can be checked before any tensor."""
    if len(data) < 8:
        raise ValueError(f"{path!r} is not a lowbit file: {len(data)} bytes, shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(
            f"{path!r} is truncated or corrupted: its header claims {size} bytes but the file has {len(data) - 8} "
            "after the length field"
        )
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path!r} is corrupted: its safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path!r} is corrupted: its safetensors header is not a JSON object")
    return header


def _checked_metadata(header: dict, path: str) -> dict[str, str]:
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise ValueError(f"{path!r} has no lowbit metadata: it was not written by lowbit.save")
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path!r} has format {metadata.get('format')!r} in its metadata, expected {FORMAT!r}")
    if "format_version" not in metadata:
        raise ValueError(f"{path!r}: the metadata lacks 'format_version'")
    if metadata["format_version"] != str(VERSION):
        raise ValueError(
            f"{path!r} has format version {metadata['format_version']!r}; this lowbit reads version {VERSION} only"
        )
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"{path!r}: the metadata lacks {missing}")
    return metadata


def _tensors(data: bytes, path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as from_bytes

    try:
        return from_bytes(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others) for malformed files
        raise ValueError(f"{path!r} is truncated or corrupted: safetensors cannot read it ({exc})") from exc


def _json_field(metadata: dict[str, str], key: str, path: str):
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path!r}: metadata {key!r} is not valid JSON ({exc})") from exc


def _skeleton(arch, model, path: str, model_class: str) -> nn.Module:
    """The module to fill: ``model`` (an instance, or a callable returning one), else ``create_model(arch)``."""
    if model is not None:
        skeleton = model() if callable(model) and not isinstance(model, nn.Module) else model
        if not isinstance(skeleton, nn.Module):
            raise TypeError(f"model must be an nn.Module or a callable returning one, got {type(skeleton).__name__}")
        return skeleton
    if arch is None:
        raise ValueError(
            f"{path!r} holds a {model_class} that lowbit cannot rebuild by itself (not built by "
            "lowbit.models.create_model): pass model=, the float, quantized or converted model (or a callable "
            "building it)"
        )
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or not isinstance(arch.get("kwargs"), dict):
        raise ValueError(f"{path!r}: metadata 'arch' must hold a model name and kwargs, got {arch!r}")
    skeleton = create_model(arch["name"], **arch["kwargs"])
    return skeleton


def _install_layers(skeleton: nn.Module, layers, path: str) -> nn.Module:
    """Puts an empty packed layer, built from its recorded config, at every recorded name."""
    if not isinstance(layers, dict):
        raise ValueError(f"{path!r}: metadata 'layers' must map layer names to configs, got {type(layers).__name__}")
    for name, config in layers.items():
        layer = from_config(config)
        if not name:
            return layer
        parent_name, _, child = name.rpartition(".")
        try:
            parent = skeleton.get_submodule(parent_name) if parent_name else skeleton
            getattr(parent, child)
        except AttributeError as exc:
            raise ValueError(f"{path!r} has a packed layer {name!r} that the model does not have") from exc
        setattr(parent, child, layer)
    return skeleton


def _load_state(skeleton: nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Strict: the same keys, dtypes and shapes as the skeleton's state dict (load_state_dict alone would cast)."""
    expected = skeleton.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path!r} does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, value in expected.items():
        got = tensors[name]
        if not isinstance(value, torch.Tensor) or got.dtype != value.dtype or got.shape != value.shape:
            what = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{path!r}: tensor {name!r} is {got.dtype} {tuple(got.shape)}, the model expects {what}")
    skeleton.load_state_dict(tensors, strict=True)


def load(path, *, model: nn.Module | Callable[[], nn.Module] | None = None, device=None) -> nn.Module:
    """Reads a model written by ``lowbit.save``; it comes back in eval mode.

    Args:
        path: the file.
        model: the architecture to fill, for models not built by ``lowbit.models.create_model``: the float,
            quantized or converted model (an instance, filled in place, or a callable returning one). Its
            layers at the recorded names are replaced by packed layers; every other tensor must match the file.
        device: where to put the model (default: CPU).

    Raises ``ValueError`` saying what is wrong when the file is truncated or corrupted (checksum mismatch),
    has no lowbit metadata, another format version, or does not fit ``model``; ``FileNotFoundError`` for a
    missing file.
    """
    path = _check_path(path, must_exist=True)
    with open(path, "rb") as f:
        data = f.read()
    metadata = _checked_metadata(_header(data, path), path)
    tensors = _tensors(data, path)
    found = checksum(tensors, metadata)
    if found != metadata["checksum"]:
        raise ValueError(
            f"{path!r} failed its checksum: the file is corrupted or was modified after lowbit.save "
            f"(recorded {metadata['checksum'][:20]}..., computed {found[:20]}...)"
        )
    arch = _json_field(metadata, "arch", path)
    skeleton = _skeleton(arch, model, path, metadata.get("model_class", "model"))
    skeleton = _install_layers(skeleton, _json_field(metadata, "layers", path), path)
    _load_state(skeleton, tensors, path)
    for name, layer in skeleton.named_modules():
        if isinstance(layer, _PackedBase):
            layer.validate(name or "model")
    if arch is not None and model is None:
        setattr(skeleton, ARCH_ATTR, {"name": arch["name"], "kwargs": arch["kwargs"]})
    return skeleton.to(device or "cpu").eval()
