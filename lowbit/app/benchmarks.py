"""``lowbit bench``: the benchmark scripts of a source checkout's bench/ folder, called in this process.

The benchmarks are not installed with the package (they time peers that the package does not depend on and write
their tables into the checkout's bench/results), so they are found on disk: ``bench/`` under the current folder,
else beside the ``lowbit`` package (an editable install of the checkout). Each script's ``main(argv)`` is called
with the arguments listed in ``BENCHMARKS``; a script that fails prints its traceback, the others still run, and
the run ends with one error naming every failed script.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from types import ModuleType

# Per device: the scripts (bench/<name>.py) and their arguments.
BENCHMARKS = {
    "cpu": [
        ("bench_fake_quant",),
        ("bench_layers",),
        ("bench_packed_linear",),
        ("bench_convert",),
        ("bench_memory",),
    ],
    "cuda": [("bench_fake_quant", "--device", "cuda"), ("bench_packed_gpu",)],
}

CHECKOUT_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")


def bench_folder() -> str:
    """The checkout's bench/ folder: the current folder's first, then the one beside the package."""
    for candidate in (os.path.join(os.getcwd(), "bench"), CHECKOUT_BENCH):
        if os.path.isfile(os.path.join(candidate, "common.py")):
            return candidate
    raise ValueError(
        "the benchmarks are not installed with lowbit: run `lowbit bench` from a source checkout (its bench/ folder)"
    )


def load(folder: str, name: str) -> ModuleType:
    """bench/<name>.py as a module. The folder goes on sys.path because the scripts import their siblings
    (``common``, ``bench_layers``) by name, as they do when run as ``python bench/<name>.py``."""
    path = os.path.join(folder, f"{name}.py")
    if not os.path.isfile(path):
        raise ValueError(f"benchmark {path!r}: no such file")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    # a name of its own: a module of the same name imported earlier from elsewhere is neither reused nor replaced
    spec = importlib.util.spec_from_file_location(f"lowbit_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def run(folder: str, name: str, argv: list[str]) -> bool:
    """Calls bench/<name>.py's ``main(argv)``; True when it returned 0. A failure prints its traceback."""
    print(f"$ python {os.path.join(folder, name)}.py {' '.join(argv)}".rstrip(), flush=True)
    try:
        return load(folder, name).main(argv) == 0
    except SystemExit as done:  # argparse or the script itself exited
        return done.code in (0, None)
    except Exception:  # a benchmark's bug: show it whole, run the others, fail at the end
        traceback.print_exc()
        return False


def run_all(device: str, quick: bool) -> str:
    """Every benchmark of ``device`` (``--quick`` added when ``quick``); returns the bench folder."""
    if device not in BENCHMARKS:
        raise ValueError(f"--device must be one of {', '.join(BENCHMARKS)}, got {device!r}")
    folder = bench_folder()
    failed = [
        name for name, *extra in BENCHMARKS[device] if not run(folder, name, [*extra] + (["--quick"] if quick else []))
    ]
    if failed:
        raise RuntimeError(f"benchmarks failed: {', '.join(failed)} (see their output above)")
    return folder
