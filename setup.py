"""Builds maskkern's native libraries from csrc/:

  maskkern._C              the op schemas (csrc/maskkern.cpp) and, with a CUDA build of torch and
                           nvcc, the CUDA kernels (csrc/cuda/)
  maskkern._cpu_<level>    the C++ CPU kernels (csrc/cpu/), once per instruction-set level —
                           default (baseline x86-64 or the platform's own), avx2, avx512 — as
                           ATen builds its CPU_CAPABILITY kernels; the package loads the widest
                           one the running CPU supports (maskkern/_backend.py)

Environment:
  MASKKERN_CUDA=1|0   force or skip the CUDA sources (default: auto-detect)
  MASKKERN_CPU_CAPABILITIES=default,avx2,avx512  the levels to build (default: all on x86-64,
                      default elsewhere); `default` is always built
  DEBUG=1             -O0 -g
  MASKKERN_SANITIZE=1 -fsanitize=address,undefined (see `make sanitize`)
  MASKKERN_SKIP_EXT=1 install the Python package only (scripts/env.sh then builds in place,
                      incrementally, so a fresh setup compiles each source once per level)
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


# The compiler flags of each at::vec level, as PyTorch builds its own CPU_CAPABILITY kernels:
# at::vec picks its SIMD width from CPU_CAPABILITY_* at compile time.
CPU_LEVELS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": [
        *("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx2"),
        *("-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"),
        # GCC 12's own avx512fintrin.h trips its -W(maybe-)uninitialized (GCC bug 105593, fixed in
        # 13) hundreds of times; the default and avx2 builds of the same sources keep the checks.
        "-Wno-maybe-uninitialized",
        "-Wno-uninitialized",
    ],
}


def _cpu_levels() -> list[str]:
    x86 = platform.machine() in ("x86_64", "AMD64")
    asked = os.environ.get("MASKKERN_CPU_CAPABILITIES")
    if asked:
        levels = [s.strip() for s in asked.split(",") if s.strip()]
    else:
        levels = list(CPU_LEVELS) if x86 else ["default"]
    unknown = set(levels) - set(CPU_LEVELS)
    if unknown:
        known = list(CPU_LEVELS)
        raise ValueError(f"MASKKERN_CPU_CAPABILITIES: unknown levels {sorted(unknown)}; known: {known}")
    if not x86 and levels != ["default"]:
        raise ValueError(f"MASKKERN_CPU_CAPABILITIES: only 'default' builds on {platform.machine()}")
    return ["default", *(lvl for lvl in levels if lvl != "default")]


def _common_flags(cuda: bool) -> tuple[list[str], list[str], list[str]]:
    """(cxx flags, link flags, torch's include paths)."""
    cxx = ["-O0", "-g"] if _env_flag("DEBUG") else ["-O3"]
    cxx += ["-fdiagnostics-color=always"]
    # GCC's note that passing 32-byte vectors changed ABI in GCC 4.6: every object of a library is
    # built by one compiler here, so there is no old ABI to meet.
    cxx += ["-Wno-psabi"]
    # at::parallel_for is a header template over OpenMP (AT_PARALLEL_OPENMP): compiled without
    # -fopenmp its pragma is ignored and every kernel runs on one thread. libgomp resolves to the
    # copy torch already loaded (same soname), so there is one OpenMP runtime and one thread pool.
    cxx += ["-fopenmp"]
    link = ["-fopenmp"]
    if _env_flag("MASKKERN_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        cxx += [*san, "-DMASKKERN_SANITIZE"]
        link += san
    # torch's headers are another project's: included as system headers, their warnings (hundreds
    # per source under Python's -Wall) are not shown; our own sources build warning-free.
    torch_paths = include_paths("cuda" if cuda else "cpu")
    cxx += [flag for path in torch_paths for flag in ("-isystem", path)]
    return cxx, link, torch_paths


def _without_torch_includes(ext, torch_paths):
    # The extension classes add torch's paths as -I, which would take precedence over -isystem.
    ext.include_dirs = [path for path in ext.include_dirs if path not in torch_paths]
    return ext


def _extensions() -> list:
    cuda = _want_cuda()
    cxx, link, torch_paths = _common_flags(cuda)
    common = dict(include_dirs=[os.path.abspath("csrc")], extra_link_args=link)
    sources = sorted(glob("csrc/*.cpp"))
    if cuda:
        nvcc = ["-O0", "-g", "-G"] if _env_flag("DEBUG") else ["-O3"]
        nvcc += ["--expt-relaxed-constexpr", *(f for p in torch_paths for f in ("-isystem", p))]
        sources += sorted(glob("csrc/cuda/*.cu"))
        core = CUDAExtension("maskkern._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)
    else:
        core = CppExtension("maskkern._C", sources, extra_compile_args={"cxx": cxx}, **common)
    out = [_without_torch_includes(core, torch_paths)]
    for level in _cpu_levels():
        flags = [*cxx, *CPU_LEVELS[level], f"-DMASKKERN_CPU_LEVEL={level}"]
        sources = sorted(glob("csrc/cpu/*.cpp"))
        ext = CppExtension(f"maskkern._cpu_{level}", sources, extra_compile_args={"cxx": flags}, **common)
        out.append(_without_torch_includes(ext, torch_paths))
    return out


setup(
    name="maskkern",
    version="0.1.0",
    description="Fused mask kernels for PyTorch: masked softmax, fused masked attention, pad-aware "
    "embedding, masked cross-entropy",
    packages=["maskkern", "maskkern.ops", "maskkern.integrations", "maskkern.triton_kernels"],
    package_dir={"maskkern.triton_kernels": "triton_kernels"},
    ext_modules=[] if _env_flag("MASKKERN_SKIP_EXT") else _extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.4; platform_system == 'Linux'"]},
)
