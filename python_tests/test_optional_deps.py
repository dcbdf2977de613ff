"""`import aem_kernels` must not import the optional integrations' packages (verl, TRL, Liger-Kernel,
Cut-Cross-Entropy, transformers, ray) even when they are installed: a fresh interpreter checks sys.modules."""

import importlib.util
import os
import subprocess
import sys

OPTIONAL = ("verl", "trl", "liger_kernel", "cut_cross_entropy", "transformers", "ray")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _optional_modules_after(imports: str) -> str:
    code = f"import sys; {imports}; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({OPTIONAL!r})))"
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def test_import_aem_kernels_imports_no_optional_package():
    assert _optional_modules_after("import aem_kernels, aem_kernels.loss, aem_kernels.packing") == "[]"
    # the probe sees such an import when one happens (where the package is installed)
    if importlib.util.find_spec("trl") is not None:
        assert "'trl'" in _optional_modules_after("import aem_kernels, trl")
