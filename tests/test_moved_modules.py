"""The module paths that moved into the layer folders (issue 15) still import, with a DeprecationWarning naming the
new path; the package functions named like old modules (lowbit.quantize, lowbit.convert, lowbit.bops) stay
functions and do not warn."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
import torch

import lowbit
from lowbit.core.moved import MOVED
from lowbit.models import create_model

# a public name the old module had, for each old path
OLD_NAMES = {
    "lowbit.quantize": "QUANT_LAYERS",
    "lowbit.swap": "swap_fused",
    "lowbit.convert": "convert",
    "lowbit.serialization": "save_model",
    "lowbit.bops": "bops",
    "lowbit.cli": "main",
    "lowbit.demo": "DemoConfig",
    "lowbit.demo_report": "summary",
    "lowbit.data": "load",
    "lowbit.train": "fit",
    "lowbit.timing": "interleaved_median_ms",
    "lowbit.frontier": "frontier_at",
    "lowbit.packed": "pack",
    "lowbit.decompositions": "use_inductor_decompositions",
    "lowbit.kernels.multi_branch": "forward",
}
# every public name of lowbit/packed.py before it moved (some now live in lowbit.core.packing)
OLD_PACKED_NAMES = [
    "pack",
    "unpack",
    "packed_linear",
    "packed_width",
    "codes_per_byte",
    "code_dtype",
    "CODE_DTYPES",
    "CONTAINER_BITS",
]


def _fresh_import(monkeypatch, old: str):
    """``import old`` written in this file, as a first import would run, whatever earlier tests imported."""
    monkeypatch.delitem(sys.modules, old, raising=False)
    exec(compile(f"import {old}", __file__, "exec"), {})
    return sys.modules[old]


def test_every_old_path_is_listed():
    assert set(OLD_NAMES) == set(MOVED)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_imports_with_a_warning_naming_the_new_one(old, monkeypatch):
    if old.startswith("lowbit.kernels"):
        pytest.importorskip("triton")
    new = MOVED[old][0]
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}") as caught:
        module = _fresh_import(monkeypatch, old)
    assert caught[0].filename == __file__  # the warning points at the importing line, not at importlib
    assert getattr(module, OLD_NAMES[old]) is getattr(importlib.import_module(new), OLD_NAMES[old])
    if len(MOVED[old]) == 1:
        assert module is importlib.import_module(new)  # patching the old path patches the code that runs


def test_from_old_packed_imports_every_old_name(monkeypatch):
    monkeypatch.delitem(sys.modules, "lowbit.packed", raising=False)
    with pytest.warns(DeprecationWarning, match="lowbit.ops.packed_linear"):
        from lowbit.packed import pack  # noqa: F401  (the issue's example)
    old = sys.modules["lowbit.packed"]
    for name in OLD_PACKED_NAMES:
        assert getattr(old, name) is not None, name
    assert old.CONTAINER_BITS[3] == 4
    with pytest.raises(AttributeError, match="no_such_name"):
        old.no_such_name  # noqa: B018


@pytest.mark.parametrize("name", ["quantize", "convert", "bops"])
def test_importing_an_old_module_keeps_the_package_function(name, monkeypatch):
    function = getattr(lowbit, name)
    with pytest.warns(DeprecationWarning):
        _fresh_import(monkeypatch, f"lowbit.{name}")
    assert getattr(lowbit, name) is function and callable(getattr(lowbit, name))


def test_the_package_functions_do_not_warn(monkeypatch):
    monkeypatch.delitem(sys.modules, "lowbit.quantize", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        model = lowbit.quantize(create_model("small_cnn", num_classes=10, in_channels=1), w_bits=4, a_bits=4)
        model(torch.rand(2, 1, 8, 8))
        assert lowbit.bops(model, torch.rand(1, 1, 8, 8)).total_bops > 0
        assert lowbit.convert(model.eval()) is not None
        from lowbit import quantize  # the function, not the old module

        assert importlib.import_module("lowbit.ops").fake_quant is lowbit.fake_quant  # a real package: no alias
    assert quantize is lowbit.quantize and "lowbit.quantize" not in sys.modules


def test_python_m_old_cli_runs_the_cli_and_warns():
    done = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "info", "--json"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert '"backends"' in done.stdout
    assert "DeprecationWarning: lowbit.cli moved to lowbit.app.cli" in done.stderr
