"""The CUDA kernels' element math, compiled as host C++ and checked against tests/reference.py (no GPU needed).

csrc/cuda/fake_quant_math.cuh, multi_branch_fake_quant.cuh and rounding.cuh are __host__ __device__ and torch-free;
the kernels include them as they are, and tests/cuda_host/host_math.cpp includes the very same files in a host program
built with the system C++ compiler (-ffp-contract=off: on the device the _rn intrinsics forbid contraction the same
way). Forward values and dx must equal the reference bit for bit; each element's dstep/doffset/dprob term is one float32
rounding (fmaf) of the exact float64 term. packed_linear.cu's word math (field unpacking, dp4a emulation, activation
codes, epilogue) is built from the .cu file itself with LOWBIT_PACKED_LINEAR_HOST_EMULATION, by nvcc where it is
installed (no GPU needed; skipped otherwise). The summation across threads and blocks needs a GPU (make gpu-check).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import reference as ref
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "cuda_host", "host_math.cpp")
U32 = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module")
def host_math(tmp_path_factory) -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH (set CXX): the CUDA element math cannot be built for the host")
    exe = str(tmp_path_factory.mktemp("cuda_host") / "host_math")
    cmd = [
        compiler,
        "-std=c++17",
        "-O2",
        "-ffp-contract=off",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-I",
        os.path.join(ROOT, "csrc"),
    ]
    subprocess.run([*cmd, SOURCE, "-o", exe], check=True, capture_output=True, text=True)
    return exe


def _run(exe: str, args: list[str], records: np.ndarray, width: int, tmp_path) -> np.ndarray:
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    records.astype("<f4").tofile(src)
    subprocess.run([exe, *args, str(src), str(dst)], check=True)
    return np.fromfile(dst, dtype="<f4").reshape(-1, width)


def _values(bits: int, signed: bool, step: float, beta: float, seed: int) -> np.ndarray:
    """Rounding ties, clamp edges and half a step beyond them, signed zeros, +-inf, NaN, huge and random values."""
    qn, qp = ref.qrange(bits, signed)
    v = np.concatenate([np.arange(qn - 2, qp + 3) + 0.5, [qn, qp, qn - 0.49, qp + 0.49, qn - 1, qp + 1, 0.0, -0.0]])
    rng = np.random.default_rng(seed)
    x = np.concatenate([v * step + beta, -v * step + beta, rng.normal(size=64) * step * qp])
    return np.concatenate([x, [np.inf, -np.inf, np.nan, 1e30, -1e30, -0.0]]).astype(np.float32)


def _assert_values_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert same.all(), f"{what}: got {got[~same][:5]}, want {want[~same][:5]}"


def _assert_one_rounding(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """A float32 term computed with one rounding: within half an ulp, i.e. u * |exact term|."""
    finite = np.isfinite(want)
    assert (np.isnan(got) == np.isnan(want)).all(), what
    err = np.abs(got[finite].astype(np.float64) - want[finite])
    assert (err <= U32 * np.abs(want[finite])).all(), (
        f"{what}: worst {np.max(err / np.maximum(np.abs(want[finite]), 1e-300))}"
    )


FQ_CASES = [
    (2, False, 0.125, 0.0),
    (3, True, 0.125, 0.0),
    (4, True, 0.1, 0.03),
    (8, False, 0.37, -0.2),
    (8, True, 2.0**-7, 0.0),
    (5, True, 1e-8, 0.0),
    (6, False, 1e4, 5.0),
]


@pytest.mark.parametrize("bits, signed, step, beta", FQ_CASES)
def test_fake_quant_element_math_matches_reference(host_math, tmp_path, bits, signed, step, beta):
    x = _values(bits, signed, step, beta, seed=bits)
    g = np.random.default_rng(bits + 100).normal(size=x.size).astype(np.float32)
    qn, qp = ref.qrange(bits, signed)
    records = np.stack([x, g, *(np.full(x.size, c, np.float32) for c in (step, beta, qn, qp))], axis=1)
    out = _run(host_math, ["fq"], records, 4, tmp_path)
    # one channel per element (axis 0) makes the reference's per-channel sums the per-element terms
    xt, n = torch.from_numpy(x), x.size
    want = ref.fake_quant(
        xt,
        torch.full((n,), step),
        bits,
        signed,
        offset=torch.full((n,), beta),
        axis=0,
        grad=torch.from_numpy(g),
        grad_scale=1.0,
    )
    _assert_values_equal(out[:, 0], want.y, "y")
    _assert_values_equal(out[:, 1], want.dx.astype(np.float32), "dx")
    _assert_one_rounding(out[:, 2], want.dstep, "dstep term")
    _assert_one_rounding(out[:, 3], want.doffset, "doffset term")


MB_CASES = [((4,), False), ((2, 4, 8), True), ((8, 2), False), ((2, 3, 4, 5, 6, 7, 8), True)]


@pytest.mark.parametrize(
    "bits, signed", MB_CASES, ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else str(c)
)
def test_multi_branch_element_math_matches_reference(host_math, tmp_path, bits, signed):
    rng = np.random.default_rng(len(bits))
    b = len(bits)
    steps = np.array([2.0 ** -(bi - 1) for bi in bits], np.float32)  # powers of two: ties and edges are exact
    probs = np.array([0.0 if i == 1 else 1.0 / (i + 1) for i in range(b)], np.float32)  # a zero probability too
    ranges = np.array([ref.qrange(bi, signed) for bi in bits], np.float32)
    x = np.concatenate([_values(bi, signed, float(s), 0.0, seed=bi) for bi, s in zip(bits, steps, strict=True)])
    g = rng.normal(size=x.size).astype(np.float32)
    head = np.concatenate([steps, probs, ranges[:, 0], ranges[:, 1]])
    out = _run(host_math, ["mb", str(b)], np.concatenate([head, np.stack([x, g], 1).ravel()]), 2 + 2 * b, tmp_path)
    want = ref.multi_branch(
        torch.from_numpy(x),
        torch.from_numpy(steps),
        torch.from_numpy(probs),
        list(bits),
        signed,
        grad=torch.from_numpy(g),
        grad_scale=[1.0] * b,
    )
    _assert_values_equal(out[:, 0], want.y, "y")
    _assert_values_equal(out[:, 1], want.dx, "dx")
    for i in range(x.size):  # per element: the reference's sums over a one-element tensor are that element's terms
        one = ref.multi_branch(
            torch.from_numpy(x[i : i + 1]),
            torch.from_numpy(steps),
            torch.ones(b),
            list(bits),
            signed,
            grad=torch.from_numpy(g[i : i + 1]),
            grad_scale=[1.0] * b,
        )
        _assert_one_rounding(out[i, 2 : 2 + b], one.dsteps, f"dstep terms of x={x[i]}")
        _assert_one_rounding(out[i, 2 + b :], one.dprobs, f"dprob terms of x={x[i]}")


# ---- packed_linear: the word math of csrc/cuda/packed_linear.cu (needs nvcc, not a GPU) ----------------------------


@pytest.fixture(scope="module")
def packed_host(tmp_path_factory) -> str:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    if nvcc is None:
        pytest.skip("nvcc not found (set NVCC): packed_linear.cu includes cuda_runtime.h, so only nvcc builds it")
    exe = str(tmp_path_factory.mktemp("cuda_host") / "packed_host")
    source = os.path.join(ROOT, "tests", "cuda_host", "packed_host.cu")
    cmd = [nvcc, "-std=c++17", "-O2", "-Werror", "all-warnings", "-I", os.path.join(ROOT, "csrc"), "-x", "cu"]
    subprocess.run([*cmd, source, "-o", exe], check=True, capture_output=True, text=True)
    return exe


def _run_words(exe: str, mode: str, words: np.ndarray, tmp_path) -> np.ndarray:
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    words.astype("<u4").tofile(src)
    subprocess.run([exe, mode, str(src), str(dst)], check=True)
    return np.fromfile(dst, dtype="<u4")


def _fields(p: np.ndarray, width: int) -> np.ndarray:
    """SPEC section 4's codes of 32-bit words: 32 / width fields, low bits first, sign-extended (n, 32 / width)."""
    shifts = np.arange(0, 32, width, dtype=np.uint64)
    raw = (p[:, None].astype(np.uint64) >> shifts) & ((1 << width) - 1)
    return np.where(raw >= 1 << (width - 1), raw.astype(np.int64) - (1 << width), raw.astype(np.int64))


def test_packed_word_dot_products_match_numpy(packed_host, tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    words = rng.integers(0, 2**32, size=(n, 2), dtype=np.uint64)
    words[:4] = [[0xFFFFFFFF, 0x80808080], [0x80808080, 0x7F7F7F7F], [0, 0xFFFFFFFF], [0x7F7F7F7F, 0x88888888]]
    out = _run_words(packed_host, "dot", words.ravel(), tmp_path).view("<i4").astype(np.int64)
    a, p = words[:, 0], words[:, 1]
    x_bytes = (a[:, None] >> np.arange(0, 32, 8, dtype=np.uint64)) & 0xFF
    want = []
    for width in (2, 4, 8):
        per_byte = 8 // width
        codes = _fields(p, width).reshape(n, 4, per_byte)  # byte j holds codes per_byte * j + g
        for signed in (True, False):
            xs = np.where(x_bytes >= 128, x_bytes.astype(np.int64) - 256, x_bytes) if signed else x_bytes
            want += [(xs.astype(np.int64) * codes[:, :, g]).sum(1) for g in range(per_byte)]
    np.testing.assert_array_equal(out.reshape(n, -1), np.stack(want, 1))


def test_packed_activation_codes_match_the_reference_quantizer(packed_host, tmp_path):
    for bits, signed in [(8, True), (8, False), (4, True), (2, False)]:
        qn, qp = ref.qrange(bits, signed)
        step = 0.125 if bits == 8 else 0.3
        x = _values(bits, signed, step, 0.0, seed=bits)
        records = np.stack([x, *(np.full(x.size, c, np.float32) for c in (step, qn, qp))], 1).view("<u4")
        got = _run_words(packed_host, "code", records.ravel(), tmp_path)
        with np.errstate(invalid="ignore"):  # SPEC section 1's level: IEEE float32 quotient, rint, clamp
            level = np.clip(np.rint(x / np.float32(step)), qn, qp)
        want = np.where(np.isnan(level), 0, np.nan_to_num(level).astype(np.int64) & 0xFF)  # NaN rows are flagged
        np.testing.assert_array_equal(got, want.astype(np.uint32))


def test_packed_epilogue_is_the_contract_float32_formula(packed_host, tmp_path):
    rng = np.random.default_rng(1)
    acc = np.concatenate([rng.integers(-(2**31), 2**31, 300), [0, -1, 2**31 - 1, -(2**31), 2**24 + 1]])
    scales = rng.uniform(1e-4, 1.0, size=(acc.size, 3)).astype(np.float32)
    scales[:, 2] -= 0.5  # bias of either sign
    records = np.concatenate([acc.astype("<i4").view("<u4")[:, None], scales.view("<u4")], 1)
    got = _run_words(packed_host, "epi", records.ravel(), tmp_path).view("<f4").reshape(-1, 2)
    scale = scales[:, 0] * scales[:, 1]  # float32 products: each operation rounded once
    plain = acc.astype(np.float32) * scale
    np.testing.assert_array_equal(got[:, 0], plain)
    np.testing.assert_array_equal(got[:, 1], plain + scales[:, 2])
