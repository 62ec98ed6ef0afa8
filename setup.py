"""Builds maskkern._C from csrc/: the C++ CPU kernels always, the CUDA kernels when a CUDA build of
torch and nvcc are present.

Environment:
  MASKKERN_CUDA=1|0   force or skip the CUDA sources (default: auto-detect)
  MASKKERN_SIMD=avx512|avx2|none  the at::vec level of the CPU kernels (default: the widest this CPU runs)
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
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, include_paths


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


def _cpu_simd() -> str:
    """The widest at::vec level this CPU runs: "avx512", "avx2" or "none"."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "none"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return "none"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "none"


# The compiler flags of each at::vec level, as PyTorch builds its own CPU_CAPABILITY kernels.
SIMD_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx2"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "none": [],
}


def _extension():
    debug = _env_flag("DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fdiagnostics-color=always"]
    # ATen's at::vec picks its SIMD width from CPU_CAPABILITY_* at compile time; without these
    # the extension gets the scalar fallback. The build is for this machine's CPU.
    simd = os.environ.get("MASKKERN_SIMD") or _cpu_simd()
    if simd not in SIMD_FLAGS:
        raise ValueError(f"MASKKERN_SIMD must be one of {sorted(SIMD_FLAGS)}, got {simd!r}")
    cxx += SIMD_FLAGS[simd]
    if simd != "none":
        cxx += [f"-DCPU_CAPABILITY_{simd.upper()}", f"-DCPU_CAPABILITY={simd.upper()}"]
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
    kwargs = dict(name="maskkern._C", include_dirs=[os.path.abspath("csrc")], extra_link_args=link)
    cuda = _want_cuda()
    # torch's headers are another project's: included as system headers, their warnings (hundreds
    # per source under Python's -Wall) are not shown; our own sources build warning-free.
    torch_paths = include_paths("cuda" if cuda else "cpu")
    system = [flag for path in torch_paths for flag in ("-isystem", path)]
    cxx += system
    if cuda:
        sources += sorted(glob("csrc/cuda/*.cu"))
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]
        nvcc += ["--expt-relaxed-constexpr", *system]
        ext = CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    # The extension classes add the same paths as -I, which would take precedence over -isystem.
    ext.include_dirs = [path for path in ext.include_dirs if path not in torch_paths]
    return ext


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
