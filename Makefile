# Every target sets itself up on a fresh machine (scripts/env.sh: .venv with torch==2.13.0 and
# triton, or the torch + triton already installed), then builds maskkern._C and the CPU kernels (one library per instruction-set level) in place.
SHELL := /bin/bash
ENV := source scripts/env.sh

.PHONY: help test bench bench-quick build lint format cuda-build triton-compile sanitize portable-check stress-64bit gpu-check info clean

help:  ## this list: every target with what it does
	@awk -F':.*## ' '/^[a-z0-9-]+:.*## / { printf "  make %-16s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

test:  ## the test suite (CPU: cpu + torch backends, triton under TRITON_INTERPRET=1)
	$(ENV) && $$PY -m pytest tests $(PYTEST_ARGS)

bench:  ## the main job: the benchmark suite on whatever device is present
	$(ENV) && $$PY bench/run.py $(BENCH_ARGS)

bench-quick:  ## the headline cases only, in about a minute (results in bench/results/tmp/)
	$(ENV) && $$PY bench/run.py --quick $(BENCH_ARGS)

build:  ## set up .venv (first time) and build maskkern._C in place (log: build/build.log)
	$(ENV)

info:  ## versions and the backends available here (python -m maskkern.info)
	$(ENV) && $$PY -m maskkern.info

lint:  ## ruff (check + format) for Python, clang-format for csrc/
	$(ENV) && ruff check . && ruff format --check . \
	  && clang-format --dry-run -Werror $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

format:  ## ruff --fix + ruff format for Python, clang-format -i for csrc/
	$(ENV) && ruff check --fix . && ruff format . \
	  && clang-format -i $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

cuda-build:  ## compile + link the CUDA sources against a CUDA build of torch (nothing runs)
	bash scripts/cuda_build.sh

triton-compile:  ## compile every Triton kernel for sm_90 (no GPU needed): registers, stack, spills
	$(ENV) && $$PY scripts/triton_compile.py

portable-check:  ## the wheel in a fresh venv, smoke-tested natively and under qemu-x86_64 -cpu EPYC-Rome (AVX2)
	bash scripts/portable_check.sh

sanitize:  ## the CPU-backend tests under AddressSanitizer + UndefinedBehaviorSanitizer
	bash scripts/sanitize.sh

stress-64bit:  ## each CPU kernel on a tensor over 2^31 elements (64-bit offsets; ~14 GiB RAM, minutes)
	$(ENV) && $$PY scripts/stress_64bit.py $(STRESS_ARGS)

gpu-check:  ## on a GPU machine: build, tests, compute-sanitizer, bench, each time-boxed (scripts/gpu_check.sh)
	bash scripts/gpu_check.sh $(STEPS)

clean:  ## remove the build (build/, maskkern/*.so)
	rm -rf build maskkern/*.so build.lock
