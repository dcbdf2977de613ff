"""`import aem_kernels` must not import the optional integrations' packages (verl, TRL, Liger-Kernel,
Cut-Cross-Entropy, transformers, ray) even when they are installed, nor do the fused-linear, causal-LM,
distributed and integrations modules; a fresh interpreter checks sys.modules (with warnings as errors, so
`available_backends()` is checked never to warn)."""

import json
import os
import subprocess
import sys

OPTIONAL = ("verl", "trl", "liger_kernel", "cut_cross_entropy", "transformers", "ray")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = f"""
import json, sys, types
seen = lambda: sorted({{m.split('.')[0] for m in sys.modules}} & set({OPTIONAL!r}))
import warnings
warnings.simplefilter("error")  # available_backends() and the imports below must not warn either
import aem_kernels, aem_kernels.loss, aem_kernels.ops.logprobs, aem_kernels.ops.segment
import aem_kernels.ops.fused_linear, aem_kernels.causal_lm, aem_kernels.ops.logprobs.gathered, aem_kernels.distributed
import aem_kernels.integrations  # the package itself; its verl/trl modules import their framework on purpose
aem_kernels.available_backends(); aem_kernels.available_backends("cpu")
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
