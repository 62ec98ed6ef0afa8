"""Builds maskkern._C from csrc/: the C++ CPU kernels always, the CUDA kernels when a CUDA build of
torch and nvcc are present.

Environment:
  MASKKERN_CUDA=1|0   force or skip the CUDA sources (default: auto-detect)
  MASKKERN_AVX2=1|0   compile the CPU kernels for AVX2+FMA (default: when this CPU has them)
  DEBUG=1             -O0 -g
  MASKKERN_SANITIZE=1 -fsanitize=address,undefined (see `make sanitize`)
  MASKKERN_SKIP_EXT=1 install the Python package only (scripts/env.sh then builds _C in place,
                      incrementally, so a fresh setup compiles each source once)
"""

import os
import platform
from glob import glob

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value in (None, "") else value not in ("0", "false", "no")


def _want_cuda() -> bool:
    forced = _env_flag("MASKKERN_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if forced and not available:
        raise RuntimeError(
            "MASKKERN_CUDA=1 but torch is not a CUDA build or CUDA_HOME/nvcc is missing "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
        )
    return available if forced is None else forced


def _cpu_has_avx2() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _extension():
    debug = _env_flag("DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fdiagnostics-color=always"]
    # ATen's at::vec picks its SIMD width from CPU_CAPABILITY_* at compile time; without these
    # the extension gets the scalar fallback.
    avx2 = _env_flag("MASKKERN_AVX2")
    if avx2 is None:
        avx2 = _cpu_has_avx2()
    if avx2:
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    # at::parallel_for is a header template over OpenMP (AT_PARALLEL_OPENMP): compiled without
    # -fopenmp its pragma is ignored and every kernel runs on one thread. libgomp resolves to the
    # copy torch already loaded (same soname), so there is one OpenMP runtime and one thread pool.
    cxx += ["-fopenmp"]
    link = ["-fopenmp"]
    if _env_flag("MASKKERN_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        cxx += [*san, "-DMASKKERN_SANITIZE"]
        link += san
    sources = sorted(glob("csrc/*.cpp")) + sorted(glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        name="maskkern._C",
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=link,
    )
    if _want_cuda():
        sources += sorted(glob("csrc/cuda/*.cu"))
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]
        nvcc += ["--expt-relaxed-constexpr"]
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    name="maskkern",
    version="0.1.0",
    description="Fused mask kernels for PyTorch: masked softmax, pad-aware embedding, masked cross-entropy",
    packages=["maskkern", "maskkern.ops", "maskkern.triton_kernels"],
    package_dir={"maskkern.triton_kernels": "triton_kernels"},
    ext_modules=[] if _env_flag("MASKKERN_SKIP_EXT") else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.4; platform_system == 'Linux'"]},
)
