"""Old module paths of lowbit that moved into the layer folders, kept importable with a DeprecationWarning.

``import lowbit.cli``, ``from lowbit.packed import pack`` and ``python -m lowbit.cli`` keep working: a finder on
``sys.meta_path`` answers for the old names only (after every other finder has found nothing), warns once with the
new path, and hands out the module at the new path itself, so that patching ``lowbit.cli.x`` patches the code that
runs. ``lowbit.quantize``, ``lowbit.convert`` and ``lowbit.bops`` are also functions of the package: importing the
old modules must not replace them, which ``KeepsFunctions`` (the package's module class) sees to.

A leaf module: it imports nothing from lowbit, so the package can install it before anything else.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

# old path -> the new path(s); the first holds the module's code, later ones names that moved on from it
MOVED: dict[str, tuple[str, ...]] = {
    "lowbit.quantize": ("lowbit.tools.quantize",),
    "lowbit.swap": ("lowbit.tools.swap",),
    "lowbit.convert": ("lowbit.tools.convert",),
    "lowbit.serialization": ("lowbit.tools.serialization",),
    "lowbit.bops": ("lowbit.tools.bops",),
    "lowbit.cli": ("lowbit.app.cli",),
    "lowbit.demo": ("lowbit.app.demo",),
    "lowbit.demo_report": ("lowbit.app.demo_report",),
    "lowbit.data": ("lowbit.app.data",),
    "lowbit.train": ("lowbit.tools.train",),
    "lowbit.timing": ("lowbit.app.timing",),
    "lowbit.frontier": ("lowbit.app.frontier",),
    "lowbit.packed": ("lowbit.ops.packed_linear", "lowbit.core.packing"),
    "lowbit.decompositions": ("lowbit.ops.decompositions",),
    "lowbit.kernels.multi_branch": ("lowbit.kernels.multi_branch_fake_quant",),
}


def message(old: str) -> str:
    new = MOVED[old]
    also = f" (and {', '.join(new[1:])})" if len(new) > 1 else ""
    return f"{old} moved to {new[0]}{also}; import it from there (the old path will be removed)"


class MovedModule(types.ModuleType):
    """An old path whose names now live in several modules: each name is read from the first that has it."""

    def __getattr__(self, name: str):
        for target in MOVED[self.__name__]:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} (it moved to {MOVED[self.__name__]})")

    def __dir__(self):
        return sorted({n for t in MOVED[self.__name__] for n in dir(importlib.import_module(t))})


class MovedLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return MovedModule(spec.name) if len(MOVED[spec.name]) > 1 else None

    def exec_module(self, module) -> None:
        # stacklevel 2 is the importing line: the warnings module skips importlib's own frames
        warnings.warn(message(module.__name__), DeprecationWarning, stacklevel=2)
        if not isinstance(module, MovedModule):
            sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__][0])

    def get_code(self, fullname: str):
        """``python -m <old path>``: the new module's code, run as ``__main__``. The warning is attributed to
        ``__main__`` so that Python's default filters show it to the person who typed the command."""
        target = importlib.util.find_spec(MOVED[fullname][0])
        warnings.warn_explicit(message(fullname), DeprecationWarning, target.origin or fullname, 0, module="__main__")
        return target.loader.get_code(target.name)


class MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, MovedLoader())


class KeepsFunctions(types.ModuleType):
    """The ``lowbit`` package's module class: importing ``lowbit.quantize`` (the old module) sets the package's
    ``quantize`` attribute to that module, which would hide the ``lowbit.quantize()`` function; this keeps it."""

    def __setattr__(self, name: str, value) -> None:
        if (
            isinstance(value, types.ModuleType)
            and callable(self.__dict__.get(name))
            and f"{self.__name__}.{name}" in MOVED
        ):
            return
        super().__setattr__(name, value)


def install(package: str) -> None:
    """Answer for the old paths (once per process) and keep the functions of ``package`` named like old modules."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())  # last: a real module of an old name is always found first
    sys.modules[package].__class__ = KeepsFunctions
