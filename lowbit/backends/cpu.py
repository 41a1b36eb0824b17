"""The C++ CPU backend: ``lowbit._C.cpu``, the kernels in ``csrc/cpu`` (AVX-512 / AVX2 / scalar, chosen at run time).

Its kernels check the values (step, offset, probs, x_step, w_scale) in C++, where a loop over C floats is free.
"""

from __future__ import annotations

from lowbit.backends import Backend, extension

_EXT, _LOAD_ERROR = extension.load()


def availability() -> tuple[bool, str]:
    if _EXT is None:
        return False, _LOAD_ERROR
    return True, f"C++ kernels, {isa()} selected at run time"


BACKEND = Backend(
    name="cpu",
    devices=("cpu",),
    availability=availability,
    kernels=None if _EXT is None else _EXT.cpu,  # csrc/cpu/<op>.cpp binds each op's kernels (bind_<op>)
)


# Queries and switches of the C++ CPU code paths (tests, benchmarks and `lowbit info` use them).


def isa() -> str:
    """The instruction-set path the C++ kernels run now: "avx512", "avx2" or "scalar"."""
    return _kernels().isa()


def supported_isas() -> list[str]:
    """The paths this CPU can run, fastest first."""
    return _kernels().supported_isas()


def set_isa(name: str) -> None:
    """Caps the path (as LOWBIT_CPU_ISA does at start-up); for tests and benchmarks."""
    _kernels().set_isa(name)


def features() -> list[str]:
    """The optional CPU features in use (avx512_vnni, amx_int8)."""
    return _kernels().features()


def packed_path_counts() -> dict[str, int]:
    """How many packed GEMM calls each path (scalar, avx2, vnni, amx, panel) has run in this process."""
    return _kernels().packed_path_counts()


def _kernels():
    if BACKEND.kernels is None:
        raise RuntimeError(f"the C++ CPU backend is unavailable: {_LOAD_ERROR}")
    return BACKEND.kernels
