# Every target sets itself up on a fresh machine (scripts/env.sh: .venv with torch==2.13.0 and
# triton, or the torch + triton already installed), then builds maskkern._C in place.
SHELL := /bin/bash
ENV := source scripts/env.sh

.PHONY: test bench bench-quick build lint format cuda-build triton-compile sanitize gpu-check info clean

test:  ## the test suite (CPU: cpu + torch backends, triton under TRITON_INTERPRET=1)
	$(ENV) && $$PY -m pytest tests $(PYTEST_ARGS)

bench:  ## the main job: the benchmark suite on whatever device is present
	$(ENV) && $$PY bench/run.py $(BENCH_ARGS)

bench-quick:
	$(ENV) && $$PY bench/run.py --quick $(BENCH_ARGS)

build:
	$(ENV)

info:
	$(ENV) && $$PY -m maskkern.info

lint:  ## ruff (check + format) for Python, clang-format for csrc/
	$(ENV) && ruff check . && ruff format --check . \
	  && clang-format --dry-run -Werror $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

format:
	$(ENV) && ruff check --fix . && ruff format . \
	  && clang-format -i $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

cuda-build:  ## compile + link the CUDA sources against a CUDA build of torch (nothing runs)
	bash scripts/cuda_build.sh

triton-compile:  ## compile every Triton kernel for sm_90 (no GPU needed): registers, stack, spills
	$(ENV) && $$PY scripts/triton_compile.py

sanitize:  ## the CPU-backend tests under AddressSanitizer + UndefinedBehaviorSanitizer
	bash scripts/sanitize.sh

gpu-check:  ## on a GPU machine: build, tests, compute-sanitizer, bench, each time-boxed (scripts/gpu_check.sh)
	bash scripts/gpu_check.sh $(STEPS)

clean:
	rm -rf build maskkern/*.so build.lock
