# One entry point per job. Every target that runs code first makes sure .venv exists with torch and the
# project installed (`pip install --no-build-isolation -e .[dev]`), and rebuilds the extension if csrc changed.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: setup demo test bench cuda-check wheel-check gpu-check lint format clean

setup: $(VENV)/.installed lowbit/.built

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q torch==$(TORCH_VERSION)
	LOWBIT_BUILD_EXTENSION=0 $(VPY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

# The editable install leaves the extension out; this builds lowbit/_C once, then again (incrementally, with
# ninja's objects in build/) only when sources change.
lowbit/.built: $(VENV)/.installed $(CSRC)
	$(VPY) setup.py -q build_ext --inplace
	touch $@

# The main job: fp32 -> MixQuant -> MetaMix -> baselines -> packed model, on the bundled digits (its time per phase
# lands in demo-results/report.md; tools/time_make_demo.sh times set-up and demo from a clean clone).
demo: setup
	$(VENV)/bin/lowbit info
	$(VENV)/bin/lowbit demo

# --hypothesis-show-statistics prints how many examples each property test ran (at least 200 per op and backend).
# Then the C++ backend's tests and those that use the default backend run again in a process capped at AVX2 and at
# scalar (LOWBIT_CPU_ISA): a smaller CPU reproduced on any machine (docs/reliability.md). The bulk bit-exact sweep
# (matches_reference) and, at avx2, the scalar cases are left out: the first run covers them at every ISA level.
# The avx2 run needs an AVX-512 CPU to differ from the first run; elsewhere it is skipped, saying why.
ISA_TESTS := tests/test_packed_linear.py tests/test_convert.py tests/test_layers.py tests/test_models.py \
	tests/test_backends.py::test_required_backends_are_available
ISA_RUN := LOWBIT_TEST_BACKENDS=cpu LOWBIT_REQUIRE_BACKENDS=cpu $(VPY) -m pytest -q $(ISA_TESTS)
BEST_ISA := $(VPY) -c "from lowbit.backends import cpu, status; assert status('cpu').available, status('cpu'); \
	print(cpu.supported_isas()[0])"
test: setup
	LOWBIT_REQUIRE_BACKENDS=reference,cpu,triton $(VPY) -m pytest -q tests --hypothesis-show-statistics
	@best=$$($(BEST_ISA)) && if [ "$$best" = avx512 ]; then set -x; \
	  LOWBIT_CPU_ISA=avx2 $(ISA_RUN) -k "not matches_reference and not cpu-scalar"; \
	else echo "LOWBIT_CPU_ISA=avx2 run skipped: it differs from the first run only on AVX-512 CPUs (this one: $$best)"; fi
	LOWBIT_CPU_ISA=scalar $(ISA_RUN) -k "not matches_reference"

# The optional peers (torchao, Brevitas, ONNX Runtime) join the tables; torch stays pinned.
bench: setup
	LOWBIT_BUILD_EXTENSION=0 $(VPY) -m pip install -q --no-build-isolation -e '.[peers]' torch==$(TORCH_VERSION)
	$(VENV)/bin/lowbit bench
	$(VPY) bench/bench_step.py
	$(VPY) bench/profile_compile.py
	$(VPY) bench/compare_backward_modes.py
	$(VPY) bench/profile_eager_step.py
	$(VPY) -m pytest -q bench --benchmark-only --benchmark-json=bench/results/pytest_benchmark_cpu.json

# Compiles every .cu file with nvcc against the torch headers: proves the CUDA sources build, no GPU needed.
cuda-check: setup
	PYTHON=$(VPY) bash tools/cuda_check.sh

# A regular `pip install .` must ship the extension and kernels/ as lowbit.kernels.
wheel-check: setup
	PYTHON=$(VPY) bash tools/wheel_check.sh

# On a CUDA machine, with its own python3 (torch with CUDA, triton): build for sm_90, test every op on triton and
# cuda, benchmark, in one run of at most 9 minutes; summary, logs and results in $(OUT) (tools/README.md).
# The device tool's run: command `bash tools/gpu_check.sh --out "$OUT"`, timeout_s 600, no carry.
OUT ?= results/gpu_check
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh --out "$(OUT)"

lint: setup
	$(VENV)/bin/ruff check lowbit kernels tests bench setup.py
	$(VENV)/bin/ruff format --check lowbit kernels tests bench setup.py

format: setup
	$(VENV)/bin/ruff format lowbit kernels tests bench setup.py
	$(VENV)/bin/ruff check --fix lowbit kernels tests bench setup.py

clean:
	rm -rf build lowbit/_C*.so lowbit/.built *.egg-info
