"""Builds the optional C++ CPU extension `aem_kernels._C` from csrc/ when torch and a compiler are present.

Set AEM_KERNELS_NO_EXTENSION=1 to skip it. Install with `pip install --no-build-isolation -e .` so the build
uses the torch already installed. A failed build only warns: the package then runs on its other backends.
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("AEM_KERNELS_NO_EXTENSION", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("aem_kernels: torch is not importable at build time; skipping the C++ extension", file=sys.stderr)
        return [], {}
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    ext = CppExtension(
        "aem_kernels._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17", *openmp]},
        extra_link_args=openmp,
    )

    class OptionalBuildExt(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # the extension is optional
                print(f"aem_kernels: C++ extension not built ({exc}); CPU tensors will use the torch reference",
                      file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
