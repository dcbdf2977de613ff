"""`import aem_kernels` must not import the optional integrations' packages (verl, TRL, Liger-Kernel,
Cut-Cross-Entropy, transformers, ray) even when they are installed: a fresh interpreter checks sys.modules."""

import json
import os
import subprocess
import sys

OPTIONAL = ("verl", "trl", "liger_kernel", "cut_cross_entropy", "transformers", "ray")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = f"""
import json, sys, types
seen = lambda: sorted({{m.split('.')[0] for m in sys.modules}} & set({OPTIONAL!r}))
import aem_kernels, aem_kernels.loss, aem_kernels.packing, aem_kernels.dispatch
after_import = seen()
sys.modules["trl.trainer"] = types.ModuleType("trl.trainer")  # the probe's own check: it sees a submodule
print(json.dumps([after_import, seen()]))
"""


def test_import_aem_kernels_imports_no_optional_package():
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=env)
    after_import, control = json.loads(out.stdout.strip().splitlines()[-1])
    assert after_import == [], after_import
    assert control == ["trl"]
