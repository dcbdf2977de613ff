"""Builds the optional C++ CPU extension `aem_kernels._C` from csrc/ when torch and a compiler are present.

Set AEM_KERNELS_NO_EXTENSION=1 to skip it. Install with `pip install --no-build-isolation -e .` so the build
uses the torch already installed. A failed build only warns: the package then runs on its other backends.
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _cxx_standard():
    """The kernels are C++17. Recent torch builds its own extensions with -std=c++20 (2.13, used here, does;
    its headers use C++20 features and only warn under C++17), older torch (the package allows >= 2.4) with
    C++17. 2.10 is taken as the switch; a torch near it at worst prints header warnings."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("AEM_KERNELS_NO_EXTENSION", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, is_ninja_available
    except ImportError:
        print("aem_kernels: torch is not importable at build time; skipping the C++ extension", file=sys.stderr)
        return [], {}
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # No -march flag: the binary must run on any CPU of its architecture. The AVX2 kernels are one translation
    # unit compiled under a target pragma (csrc/row_kernels_avx2.cpp) and chosen at run time. The two -fno-*
    # flags change no result (no reassociation, no fast-math): they let the compiler if-convert and vectorise
    # the loops whose float selects it would otherwise keep as branches (torch builds itself with them too).
    cxx_flags = ["-O3", _cxx_standard(), "-fno-trapping-math", "-fno-math-errno", *openmp]
    if os.environ.get("AEM_KERNELS_VEC_REPORT", "0") == "1":  # print which loops were vectorised
        cxx_flags.append("-fopt-info-vec-optimized")
    ext = CppExtension(
        "aem_kernels._C",
        sources,
        depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=openmp,
    )

    class OptionalBuildExt(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # the extension is optional
                print(f"aem_kernels: C++ extension not built ({exc}); CPU tensors will use the torch reference",
                      file=sys.stderr)

    # ninja (when installed) compiles the sources in parallel and rebuilds only what changed.
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=is_ninja_available())}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
