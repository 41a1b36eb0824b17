"""``lowbit.save`` / ``lowbit.load``: a converted model in one safetensors file (format in docs/serialization.md).
``save_model`` / ``load_model`` do the same for float and fake-quant models, ``state_bytes`` / ``read_state`` for
training checkpoints (nested dicts of tensors and plain values). No file lowbit reads runs code: every format is
safetensors plus JSON metadata; a pickle file is read only through ``torch_load``, with ``weights_only=True``
unless the caller opts in with ``allow_pickle=True``.

The file holds every state-dict tensor (packed weight codes in the canonical layout of SPEC section 4, steps,
biases, BN statistics, ...) and, in the safetensors metadata, the format name and version, how to rebuild the
architecture, each packed layer's configuration and a sha256 checksum over the tensors and the metadata. ``load``
checks all of it before building anything, so a truncated, corrupted or tampered file raises ``ValueError``
saying what is wrong instead of giving a wrong model. (The checksum detects accidents, not forgery: anyone can
recompute it.) ``save`` writes to a temporary file in the target folder, fsyncs it and renames it over the target,
so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lowbit.models import ARCH_ATTR, create_model
from lowbit.nn.layers import MultiBranchQConv2d, MultiBranchQLinear, QConv2d, QLinear
from lowbit.nn.packed import RENAMED, PackedBase, from_config
from lowbit.nn.quantizers import FoldedClip
from lowbit.tools.convert import fuse_inference
from lowbit.tools.fold import fold_activation_clips, unfold_activation_clips

FORMAT = "lowbit.packed"
VERSION = 2  # 2: the training layers' names (a_bits, a_signed, w_step, a_step); version 1 files are translated on read
READ_VERSIONS = (1, 2)
REQUIRED_METADATA = ("format", "format_version", "arch", "layers", "checksum")
MODEL_FORMAT = "lowbit.model"  # float and fake-quant models (the input of lowbit.convert)
MODEL_VERSION = 1
REQUIRED_MODEL_METADATA = ("format", "format_version", "arch", "layers", "extra_state", "checksum")
CHECKPOINT_FORMAT = "lowbit.checkpoint"  # training state: nested dicts/lists of tensors and plain values
CHECKPOINT_VERSION = 1
REQUIRED_CHECKPOINT_METADATA = ("format", "format_version", "state", "checksum")
PICKLE = "pickle"  # what file_format calls a torch.save / pickle file
# What to tell someone who hands one format to a reader of another.
_READERS = {
    FORMAT: "a converted (packed) model: lowbit.load reads it",
    MODEL_FORMAT: "a float or fake-quant model: lowbit.load_model reads it, lowbit.convert packs it",
    CHECKPOINT_FORMAT: "a training checkpoint, not a model",
}


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

    layers = {name: m.config() for name, m in model.named_modules() if isinstance(m, PackedBase)}
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
    """Writes a converted model to ``path`` (safetensors, format ``lowbit.packed`` version 2), atomically.

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


def _checked_metadata(header: dict, path: str, fmt: str, versions: tuple[int, ...], required) -> dict[str, str]:
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise ValueError(f"{path!r} has no lowbit metadata: it was not written by lowbit")
    if metadata.get("format") != fmt:
        found = metadata.get("format")
        hint = f" ({_READERS[found]})" if found in _READERS else ""
        raise ValueError(f"{path!r} has format {found!r} in its metadata, expected {fmt!r}{hint}")
    if "format_version" not in metadata:
        raise ValueError(f"{path!r}: the metadata lacks 'format_version'")
    if metadata["format_version"] not in [str(v) for v in versions]:
        readable = f"version {versions[0]} only" if len(versions) == 1 else f"versions {', '.join(map(str, versions))}"
        raise ValueError(f"{path!r} has format version {metadata['format_version']!r}; this lowbit reads {readable}")
    missing = [key for key in required if key not in metadata]
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
    try:
        return create_model(arch["name"], **arch["kwargs"])
    except (TypeError, ValueError) as exc:  # unknown name or kwargs the constructor rejects
        raise ValueError(f"{path!r}: metadata 'arch' {arch['name']!r} cannot be built ({exc})") from exc


def _layer_configs(layers, path: str) -> dict:
    if not isinstance(layers, dict):
        raise ValueError(f"{path!r}: metadata 'layers' must map layer names to configs, got {type(layers).__name__}")
    return layers


def _from_version_1(layers, tensors: dict[str, torch.Tensor], path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A version 1 file's layer configs and tensors under the version 2 names (``RENAMED``: ``x_bits`` ->
    ``a_bits``, ``x_signed`` -> ``a_signed``, ``<layer>.w_scale`` -> ``<layer>.w_step``, ``<layer>.x_step`` ->
    ``<layer>.a_step``); the values are unchanged, and the checksum was checked on the file as written."""
    layers = {name: _renamed_config(config) for name, config in _layer_configs(layers, path).items()}
    renamed = {}
    for name in layers:
        prefix = f"{name}." if name else ""
        for old, new in RENAMED.items():
            if prefix + old in tensors:
                renamed[prefix + old] = prefix + new
    return layers, {renamed.get(key, key): value for key, value in tensors.items()}


def _renamed_config(config):
    if not isinstance(config, dict):
        return config  # from_config names what is wrong with it
    return {RENAMED.get(key, key): value for key, value in config.items()}


def _put_layer(skeleton: nn.Module, name: str, layer: nn.Module, path: str, kind: str) -> None:
    """Sets ``layer`` at ``name`` of ``skeleton``, which must already have a module there."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = skeleton.get_submodule(parent_name) if parent_name else skeleton
        getattr(parent, child)
    except AttributeError as exc:
        raise ValueError(f"{path!r} has a {kind} layer {name!r} that the model does not have") from exc
    setattr(parent, child, layer)


def _install_layers(skeleton: nn.Module, layers, path: str) -> nn.Module:
    """Puts an empty packed layer, built from its recorded config, at every recorded name."""
    for name, config in _layer_configs(layers, path).items():
        layer = from_config(config)
        if not name:
            return layer
        _put_layer(skeleton, name, layer, path, "packed")
    return skeleton


def _load_state(skeleton: nn.Module, tensors: dict[str, torch.Tensor], path: str, extra: dict | None = None) -> None:
    """Strict: the same keys, dtypes and shapes as the skeleton's state dict (load_state_dict alone would cast).
    ``extra`` holds the non-tensor entries (modules' ``get_extra_state``), which must sit where the model has them."""
    given = {**tensors, **(extra or {})}
    expected = skeleton.state_dict()
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path!r} does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, value in expected.items():
        got = given[name]
        if not isinstance(value, torch.Tensor) and not isinstance(got, torch.Tensor):
            continue  # extra state, checked by the module that reads it
        if not isinstance(value, torch.Tensor) or not isinstance(got, torch.Tensor):
            raise ValueError(f"{path!r}: entry {name!r} is a {type(got).__name__}, the model expects a "
                             f"{type(value).__name__}")  # fmt: skip
        if got.dtype != value.dtype or got.shape != value.shape:
            raise ValueError(
                f"{path!r}: tensor {name!r} is {got.dtype} {tuple(got.shape)}, the model expects "
                f"{value.dtype} {tuple(value.shape)}"
            )
    try:
        skeleton.load_state_dict(given, strict=True)
    except (TypeError, ValueError, KeyError) as exc:  # a module's set_extra_state rejecting what it was given
        raise ValueError(f"{path!r}: the model rejects the file's module state ({exc})") from exc


def _read(path, fmt: str, versions: tuple[int, ...], required) -> tuple[dict[str, str], dict[str, torch.Tensor], str]:
    """Metadata and tensors of a lowbit safetensors file of format ``fmt`` (one of ``versions``), every check done,
    checksum last."""
    path = _check_path(path, must_exist=True)
    with open(path, "rb") as f:
        data = f.read()
    metadata = _checked_metadata(_header(data, path), path, fmt, versions, required)
    tensors = _tensors(data, path)
    found = checksum(tensors, metadata)
    if found != metadata["checksum"]:
        raise ValueError(
            f"{path!r} failed its checksum: the file is corrupted or was modified after lowbit wrote it "
            f"(recorded {metadata['checksum'][:20]}..., computed {found[:20]}...)"
        )
    return metadata, tensors, path


def load(path, *, model: nn.Module | Callable[[], nn.Module] | None = None, device=None) -> nn.Module:
    """Reads a model written by ``lowbit.save``; it comes back in eval mode.

    Args:
        path: the file.
        model: the architecture to fill, for models not built by ``lowbit.models.create_model``: the float,
            quantized or converted model (an instance, filled in place, or a callable returning one). Its
            layers at the recorded names are replaced by packed layers; every other tensor must match the file.
        device: where to put the model (default: CPU).

    Reads format versions 1 and 2 (a version 1 file's names are translated, see ``_from_version_1``). Raises
    ``ValueError`` saying what is wrong when the file is truncated or corrupted (checksum mismatch), has no lowbit
    metadata, another format version, or does not fit ``model``; ``FileNotFoundError`` for a missing file.
    """
    metadata, tensors, path = _read(path, FORMAT, READ_VERSIONS, REQUIRED_METADATA)
    arch = _json_field(metadata, "arch", path)
    layers = _json_field(metadata, "layers", path)
    if metadata["format_version"] == "1":
        layers, tensors = _from_version_1(layers, tensors, path)
    skeleton = _skeleton(arch, model, path, metadata.get("model_class", "model"))
    skeleton = _install_layers(skeleton, layers, path)
    _load_state(skeleton, tensors, path)
    for name, layer in skeleton.named_modules():
        if isinstance(layer, PackedBase):
            layer.validate(name or "model")
    fuse_inference(skeleton, strict=False)  # the run-time integer data path (never saved), as convert builds it
    if arch is not None and model is None:
        setattr(skeleton, ARCH_ATTR, {"name": arch["name"], "kwargs": arch["kwargs"]})
    return skeleton.to(device or "cpu").eval()


# ---------------------------------------------------------------------------------------------------------------
# float and fake-quant models: format lowbit.model
# ---------------------------------------------------------------------------------------------------------------

FAKE_QUANT_LAYERS = {cls.__name__: cls for cls in (QConv2d, QLinear, MultiBranchQConv2d, MultiBranchQLinear)}


def fake_quant_config(layer: nn.Module) -> dict:
    """JSON-able constructor arguments of a ``QConv2d`` / ``QLinear`` / multi-branch layer, plus ``type``. The
    quantizers' own state (bits, signedness, whether initialised) is their extra state, saved with the tensors."""
    config: dict = {"type": type(layer).__name__, "w_bits": layer.w_bits, "bias": layer.bias is not None}
    if isinstance(layer, nn.Conv2d):
        config.update(
            in_channels=layer.in_channels,
            out_channels=layer.out_channels,
            kernel_size=list(layer.kernel_size),
            stride=list(layer.stride),
            padding=layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            dilation=list(layer.dilation),
            groups=layer.groups,
            padding_mode=layer.padding_mode,
        )
    else:
        config.update(in_features=layer.in_features, out_features=layer.out_features)
    if isinstance(layer, (MultiBranchQConv2d, MultiBranchQLinear)):
        config["a_bits_choices"] = list(layer.candidate_bits)
    else:
        config["a_bits"] = layer.a_bits
    return config


def fake_quant_from_config(config) -> nn.Module:
    """An untrained fake-quant layer built from ``fake_quant_config(layer)``; ValueError on a bad config."""
    if not isinstance(config, dict) or config.get("type") not in FAKE_QUANT_LAYERS:
        found = config.get("type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"config must name a fake-quant layer type ({', '.join(FAKE_QUANT_LAYERS)}), got {found!r}")
    cls = FAKE_QUANT_LAYERS[config["type"]]
    try:
        return cls(**{k: v for k, v in config.items() if k != "type"})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config does not describe a {cls.__name__}: {exc}") from exc


def _install_fake_quant(skeleton: nn.Module, layers, path: str) -> nn.Module:
    """Puts an untrained fake-quant layer, built from its recorded config, at every recorded name."""
    for name, config in _layer_configs(layers, path).items():
        try:
            layer = fake_quant_from_config(config)
        except ValueError as exc:
            raise ValueError(f"{path!r}: layer {name!r}: {exc}") from exc
        _put_layer(skeleton, name, layer, path, "fake-quant")
    return skeleton


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict as detached contiguous CPU tensors, and its other entries (modules' extra state)."""
    tensors, extra = {}, {}
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        else:
            extra[name] = value
    return tensors, extra


def _first_difference(model: nn.Module, rebuilt: nn.Module) -> str | None:
    mine = {n: type(m) for n, m in model.named_modules()}
    theirs = {n: type(m) for n, m in rebuilt.named_modules()}
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        if a is not b:
            what = lambda t: t.__name__ if t is not None else "absent"  # noqa: E731
            return f"module {name or '(root)'!r} is {what(a)} in the model, {what(b)} when rebuilt"
    return None


def _check_rebuilds(model: nn.Module, arch: dict, layers: dict, tensors: dict, extra: dict) -> None:
    """``save_model`` refuses what ``load_model`` could not rebuild: the recorded architecture plus the recorded
    fake-quant layers must give the model's module tree and a state dict that takes the model's tensors."""
    where = f"model (recorded architecture {arch['name']!r})"
    try:
        rebuilt = _install_fake_quant(_skeleton(arch, None, where, ""), layers, where)
    except ValueError as exc:
        raise ValueError(f"model cannot be rebuilt from what would be saved: {exc}") from exc
    difference = _first_difference(model, rebuilt)
    if difference is None:
        try:
            stored = json.loads(json.dumps(_encode(extra, "extra_state", {})))  # what load_model will get back
            _load_state(rebuilt, tensors, where, _decode(stored, {}, where))
        except ValueError as exc:
            difference = str(exc)
    if difference is not None:
        raise ValueError(
            f"model cannot be rebuilt from its recorded architecture and layers ({difference}): save only models "
            f"built by lowbit.models.create_model and changed by lowbit.quantize / the methods, or delete "
            f"model.{ARCH_ATTR} and pass model= to lowbit.load_model"
        )


def save_model(model: nn.Module, path) -> None:
    """Writes a float or fake-quant model (the input of ``lowbit.convert``) to ``path``: safetensors, format
    ``lowbit.model`` version 1, atomically, with a checksum. No pickle: the file holds tensors, and JSON for the
    architecture, each fake-quant layer's configuration and the quantizers' state.

    Args:
        model: an ``nn.Module`` whose layers are those of its architecture, some replaced by ``QConv2d`` /
            ``QLinear`` / ``MultiBranchQConv2d`` / ``MultiBranchQLinear`` (what ``lowbit.quantize``, MixQuant and
            MetaMix produce). A model built by ``lowbit.models.create_model`` records how to rebuild it, and
            ``save_model`` checks that it does; any other model needs ``model=`` at load. Converted (packed)
            models go to ``lowbit.save``.
        path: the file to write (its folder must exist).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = _check_path(path, must_exist=False)
    packed = [n or "(root)" for n, m in model.named_modules() if isinstance(m, PackedBase)]
    if packed:
        raise ValueError(f"model has packed layers ({', '.join(packed[:5])}): save converted models with lowbit.save")
    folded = any(isinstance(m, FoldedClip) for m in model.modules())
    if folded:  # the file holds the model's own layers; load_model folds them again ("folded_clips")
        model = copy.deepcopy(model)
        unfold_activation_clips(model)
    tensors, extra = _split_state(model)
    kinds = tuple(FAKE_QUANT_LAYERS.values())
    layers = {n: fake_quant_config(m) for n, m in model.named_modules() if type(m) in kinds}
    arch = _arch(model)
    if arch is not None:
        _check_rebuilds(model, arch, layers, tensors, extra)
    import lowbit

    cls = type(model)
    metadata = {
        "format": MODEL_FORMAT,
        "format_version": str(MODEL_VERSION),
        "lowbit_version": lowbit.__version__,
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "arch": json.dumps(arch),
        "layers": json.dumps(layers),
        "extra_state": json.dumps(_encode(extra, "model's extra state", {})),
        "folded_clips": json.dumps(folded),
    }
    metadata["checksum"] = checksum(tensors, metadata)
    _write_atomically(path, _serialize(tensors, metadata))


def _same_arch(skeleton: nn.Module, arch, path: str) -> None:
    """A ``model=`` built by create_model must be the architecture the file records."""
    mine = getattr(skeleton, ARCH_ATTR, None)
    if arch is None or mine is None:
        return
    recorded = {"name": arch.get("name"), "kwargs": arch.get("kwargs")}
    if json.loads(json.dumps(mine)) != recorded:
        raise ValueError(
            f"{path!r} holds a {recorded['name']} {recorded['kwargs']}, but model is a {mine['name']} {mine['kwargs']}"
        )


def _check_quantizers(model: nn.Module, path: str) -> None:
    """What a module's extra state set must be a valid quantizer: bits in 2..8, a flag for signedness."""
    from lowbit.core import checks
    from lowbit.nn.quantizers import LSQQuantizer, MultiBranchQuantizer

    for name, m in model.named_modules():
        try:
            if isinstance(m, LSQQuantizer):
                checks.bits("bits", m.bits)
            elif isinstance(m, MultiBranchQuantizer):
                checks.bit_list("bits", m.bits)
            if isinstance(m, (LSQQuantizer, MultiBranchQuantizer)) and m.signed not in (True, False, None):
                raise ValueError(f"signed must be True, False or None, got {m.signed!r}")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path!r}: quantizer {name!r} has an invalid state ({exc})") from exc


def load_model(path, *, model: nn.Module | Callable[[], nn.Module] | None = None, device=None) -> nn.Module:
    """Reads a model written by ``save_model``; it comes back in eval mode (call ``.train()`` to train on).

    Args:
        path: the file.
        model: the architecture to fill, for models not built by ``lowbit.models.create_model`` (an instance,
            filled in place, or a callable returning one); fake-quant layers are put at the recorded names. A
            ``model`` built by ``create_model`` must be the architecture the file records.
        device: where to put the model (default: CPU).

    Raises ``ValueError`` saying what is wrong when the file is not a ``lowbit.model`` file, is truncated or
    corrupted, records an architecture or layers that cannot be built, or does not fit ``model``.
    """
    metadata, tensors, path = _read(path, MODEL_FORMAT, (MODEL_VERSION,), REQUIRED_MODEL_METADATA)
    arch = _json_field(metadata, "arch", path)
    skeleton = _skeleton(arch, model, path, metadata.get("model_class", "model"))
    if model is not None:
        _same_arch(skeleton, arch, path)
    skeleton = _install_fake_quant(skeleton, _json_field(metadata, "layers", path), path)
    extra = _decode(_json_field(metadata, "extra_state", path), {}, path)
    if not isinstance(extra, dict):
        raise ValueError(f"{path!r}: metadata 'extra_state' must be a JSON object, got {type(extra).__name__}")
    _load_state(skeleton, tensors, path, extra)
    _check_quantizers(skeleton, path)
    if metadata.get("folded_clips") is not None and _json_field(metadata, "folded_clips", path) is True:
        fold_activation_clips(skeleton, strict=False)  # as the saved model was (lowbit.quantize's default)
    if arch is not None and model is None:
        setattr(skeleton, ARCH_ATTR, {"name": arch["name"], "kwargs": arch["kwargs"]})
    return skeleton.to(device or "cpu").eval()


# ---------------------------------------------------------------------------------------------------------------
# training state (checkpoints): format lowbit.checkpoint
# ---------------------------------------------------------------------------------------------------------------
# Nested values become JSON; tensors become safetensors entries named by their place in the tree and appear in the
# JSON as {"$tensor": name}. JSON has no tuples and only string keys, so tuples are {"$tuple": [...]} and a dict
# with other keys (an optimizer's state is keyed by parameter index) is {"$dict": [[key, value], ...]}.


def _encode(value, where: str, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        name = where if where not in tensors else f"{where}#{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic) and isinstance(value.item(), (bool, int, float)):
        return value.item()  # a NumPy scalar: stored as the Python number of the same value
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{where}/{k}", tensors) for k, v in value.items()}
        return {"$dict": [[_encode(k, where, {}), _encode(v, f"{where}/{k}", tensors)] for k, v in value.items()]}
    raise TypeError(
        f"state entry {where} is a {type(value).__name__}: lowbit stores tensors, numbers, strings, None, lists, "
        "tuples and dicts only (no pickle)"
    )


def _decode(node, tensors: dict[str, torch.Tensor], path: str):
    if isinstance(node, list):
        return [_decode(v, tensors, path) for v in node]
    if not isinstance(node, dict):
        return node
    marked = [k for k in node if k.startswith("$")]
    if not marked:
        return {k: _decode(v, tensors, path) for k, v in node.items()}
    kind = marked[0]
    if len(node) != 1 or kind not in ("$tensor", "$tuple", "$dict"):
        raise ValueError(f"{path!r} is corrupted: unknown entry {sorted(node)} in its state")
    if kind == "$tensor":
        if node[kind] not in tensors:
            raise ValueError(f"{path!r} is corrupted: its state refers to a tensor {node[kind]!r} it does not hold")
        return tensors[node[kind]]
    if kind == "$tuple":
        return tuple(_decode(v, tensors, path) for v in node[kind])
    try:
        return {_hashable(_decode(k, tensors, path)): _decode(v, tensors, path) for k, v in node[kind]}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} is corrupted: a '$dict' entry is not a list of [key, value] pairs") from exc


def _hashable(key):
    hash(key)  # TypeError for a list or dict key: the file was not written by state_bytes
    return key


def state_bytes(state: dict) -> bytes:
    """A training state (nested dicts / lists / tuples of tensors, numbers, strings, None) as the bytes of a
    ``lowbit.checkpoint`` file; ``read_state`` gives it back with every value and tensor (dtype, shape, bits)
    equal and tensors on the CPU. TypeError names any other value (no pickle)."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    import lowbit

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "state", tensors)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_VERSION),
        "lowbit_version": lowbit.__version__,
        "state": json.dumps(tree),
    }
    metadata["checksum"] = checksum(tensors, metadata)
    return _serialize(tensors, metadata)


def read_state(path) -> dict:
    """The state written by ``state_bytes`` to ``path``, checked as every lowbit file (format, version, checksum)."""
    metadata, tensors, path = _read(path, CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,), REQUIRED_CHECKPOINT_METADATA)
    state = _decode(_json_field(metadata, "state", path), tensors, path)
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} is corrupted: its state is a {type(state).__name__}, not a dict")
    return state


# ---------------------------------------------------------------------------------------------------------------
# what a file is, and pickle files only on request
# ---------------------------------------------------------------------------------------------------------------

_EXPECTED = "expected a file written by lowbit (safetensors with lowbit metadata)"


def file_format(path) -> str:
    """``lowbit.packed``, ``lowbit.model``, ``lowbit.checkpoint`` or ``pickle`` (a ``torch.save`` / pickle file),
    from the file's first bytes and header alone (nothing is loaded); ValueError naming the file for anything
    else."""
    path = _check_path(path, must_exist=True)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if 0 < length <= size - 8 and f.read(1) == b"{":  # a safetensors header
            f.seek(8)
            header = _header(head + f.read(length), path)
        elif head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
            return PICKLE  # torch.save's zip archive, or a bare pickle (protocol 2..5)
        elif len(head) < 8:
            raise ValueError(f"{path!r} is not a lowbit file: {size} bytes, {_EXPECTED}")
        else:
            raise ValueError(f"{path!r} is not a lowbit file (or is truncated): it starts with {head!r}; {_EXPECTED}")
    found = header.get("__metadata__", {}).get("format") if isinstance(header.get("__metadata__"), dict) else None
    if found not in _READERS:
        raise ValueError(f"{path!r} is a safetensors file without lowbit metadata (format {found!r}); {_EXPECTED}")
    return found


def torch_load(path, *, allow_pickle: bool = False, map_location="cpu"):
    """``torch.load`` for files from older lowbit versions (or your own ``torch.save``), safely by default.

    Tries ``weights_only=True`` (tensors, dicts, lists and numbers only: nothing runs). A file that needs more
    (a whole pickled model, NumPy RNG tuples) is refused with ValueError unless ``allow_pickle=True``, which
    unpickles it fully: that runs whatever code the file contains, so pass it only for files you trust (ones you
    wrote yourself). Any failure to read is a one-line ValueError naming the file.
    """
    import pickle

    if not isinstance(allow_pickle, bool):
        raise TypeError(f"allow_pickle must be a bool, got {type(allow_pickle).__name__}")
    path = _check_path(path, must_exist=True)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass  # holds more than tensors: only with the caller's consent
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... for files that are not what they claim
        raise ValueError(f"{path!r} is not a readable PyTorch file ({_first_line(exc)})") from exc
    if not allow_pickle:
        raise ValueError(
            f"{path!r} is a pickle file with Python objects, not only tensors; unpickling it can run any code it "
            "contains: pass allow_pickle=True (lowbit convert / eval: --allow-pickle) only if you trust it"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a damaged or foreign pickle fails in any way unpickling can
        raise ValueError(f"{path!r} cannot be unpickled ({type(exc).__name__}: {_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def describe(fmt: str) -> str:
    """What a ``file_format`` result is, for messages."""
    return _READERS.get(fmt, "a pickle (torch.save) file")
