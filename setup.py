"""Build the compiled extension ``lowbit._C``.

CPU kernels (``csrc/cpu``) always build. They are compiled once with generic flags; the AVX-512 and
AVX2 variants are selected at run time (``csrc/cpu/isa.h``), never by ``-march=native``.

CUDA kernels (``csrc/cuda``) build when a CUDA toolkit and a CUDA build of torch are both present.
``LOWBIT_CUDA=1`` forces them on (the build fails loudly if it cannot), ``LOWBIT_CUDA=0`` forces them off.

``LOWBIT_BUILD_EXTENSION=0`` leaves the extension out: ``make setup`` installs the package editable that way and
then builds the extension once with ``setup.py build_ext --inplace``, whose objects in build/ make later rebuilds
incremental (pip's editable build would compile it in a temporary folder, and build_ext a second time).
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted() -> bool:
    switch = os.environ.get("LOWBIT_CUDA", "auto").strip().lower()
    if switch in ("0", "off", "false", "no"):
        return False
    import torch

    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if switch in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError(
                "LOWBIT_CUDA=1 but a CUDA build needs both a CUDA torch "
                f"(torch.version.cuda={torch.version.cuda}) and a CUDA toolkit (CUDA_HOME={cpp_extension.CUDA_HOME})"
            )
        return True
    return available


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    with_cuda = _cuda_wanted()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # C++20: torch's own headers need it (with C++17 they warn about C++20 features on every file).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", f"-DLOWBIT_WITH_CUDA={int(with_cuda)}"]
    args = {"cxx": cxx}
    if with_cuda:
        sources += _sources("csrc/cuda/*.cu")
        args["nvcc"] = ["-O3", "-std=c++20", "-lineinfo"]  # C++20 for torch's headers here too
        cls = cpp_extension.CUDAExtension
    else:
        cls = cpp_extension.CppExtension
    return cls(
        name="lowbit._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=args,
        extra_link_args=["-fopenmp"],
    )


setup(
    # kernels/ lives at the top of the repository and installs as lowbit.kernels
    packages=[*find_packages(include=["lowbit", "lowbit.*"]), "lowbit.kernels"],
    package_dir={"lowbit.kernels": "kernels"},
    ext_modules=[] if os.environ.get("LOWBIT_BUILD_EXTENSION", "1") == "0" else [_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
