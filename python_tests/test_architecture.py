"""The layout's promises, checked by walking every module's imports (AST, so each check can fail and names the
offender): ops/ import nothing above them; production code never imports an oracle (`naive.py`), statically and
after running every backend; no module imports another module's private (`_name`) names; no import circle in
aem_kernels/, bench/ or python_tests/; test modules never import each other; every op folder holds its oracle
and, in its __init__, its one path decision; `import aem_kernels` loads no framework, trainer or benchmark; the
decisions route as documented; the README names every public name and module."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import aem_kernels as ak
from aem_kernels import capability
from aem_kernels.ops.fused_linear import resolve_fused_linear_path
from aem_kernels.ops.logprobs import resolve_backend
from import_walker import (ROOT, TREES, compiled_modules, cycles, import_graph, imported_test_modules, imports_of,
                           known_package_modules, modules, private_imports, sources, targets)

PACKAGE = TREES["aem_kernels"]
# what an op must not know about: everything above ops/ in the layout
ABOVE_OPS = {"aem_kernels." + name for name in ("loss", "causal_lm", "distributed", "integrations", "train", "demo")}
# each op folder's path decision, defined in its __init__.py and nowhere else
DECISIONS = {"logprobs": "resolve_backend", "fused_linear": "resolve_fused_linear_path",
             "segment": "resolve_segment_sum", "policy_loss": "single_pass_unavailable"}


def test_the_walker_sees_every_form():
    """The checker itself: each spelling of each offence is caught, and what is allowed is not (so the checks
    below can fail)."""
    ops = "aem_kernels.ops.logprobs.triton"
    for source in ("from ...loss import terms", "from ... import loss", "import aem_kernels.train.loop",
                   "def f():\n    from ...causal_lm import causal_lm_logprobs_and_entropy\n"):
        found = {t for imp in imports_of(source, ops) for t in (imp.target,) + tuple(
            f"{imp.target}.{n}" for n in imp.names)}
        assert any(t == f or t.startswith(f + ".") for t in found for f in ABOVE_OPS), source
    assert not imports_of("if TYPE_CHECKING:\n    from ...loss import terms\n", ops)
    known = {"aem_kernels", "aem_kernels.ops", "aem_kernels.ops.utils", "aem_kernels.ops.logprobs",
             "aem_kernels.ops.logprobs.triton", "aem_kernels.ops.logprobs._impl", "aem_kernels._C"}
    for source in ("from ..utils import _to_fp32", "from . import _WARNED", "import aem_kernels.ops.utils as u\n"
                   "u._to_fp32(1.0)", "from aem_kernels.ops import utils\nutils._to_fp32(1.0)",
                   "import aem_kernels.ops.utils\naem_kernels.ops.utils._to_fp32(1.0)",
                   "from ... import ops\nops.utils._to_fp32(1.0)", "from . import Backend\nBackend._load()"):
        assert private_imports(source, ops, False, known), source
    for source in ("from ..utils import to_storage\n_x = 1\n_x += 1", "from ... import _C", "from . import _impl",
                   "from ..utils import __doc__", "import torch\ntorch._dynamo.reset()"):
        assert not private_imports(source, ops, False, known), source
    assert private_imports("from ..logprobs import _impl", "aem_kernels.ops.segment.cpu", False, known)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = import_graph({"p": ("from .q import f", True), "p.q": ("import p", False)})
    assert graph == {"p": {"p.q"}, "p.q": {"p"}}   # an __init__'s re-export closes the circle
    extension = {"p": ("from .q import f", True), "p.q": ("from . import _C", False)}
    assert cycles(import_graph(extension, {"p._C"})) == []          # the compiled p._C is a module, not p's name
    assert cycles(import_graph(extension)) == [["p", "p.q"]]


# ---- the rules ------------------------------------------------------------------------------------------------

OPS_MODULES = [m for m in modules("aem_kernels") if m.startswith("aem_kernels.ops")]


@pytest.mark.parametrize("module", OPS_MODULES)
def test_ops_import_nothing_above_them(module):
    text, pkg = sources("aem_kernels")[module]
    hits = sorted({f"line {imp.line}: {t}" for imp in imports_of(text, module, pkg)
                   for t in (imp.target,) + tuple(f"{imp.target}.{n}" for n in imp.names)
                   if any(t == f or t.startswith(f + ".") for f in ABOVE_OPS)})
    assert not hits, f"{module} imports {hits}"


def test_production_code_never_imports_an_oracle():
    offenders = {}
    for module, (text, pkg) in sources("aem_kernels").items():
        if module.endswith(".naive"):
            continue   # an oracle may build on another oracle
        hits = sorted({t for imp in imports_of(text, module, pkg) for t in targets(imp, known_package_modules())
                       if "naive" in t.split(".")})
        if hits:
            offenders[module] = hits
    assert not offenders, offenders


def test_running_every_backend_leaves_the_oracles_unimported(tmp_path):
    code = f"""
        import sys, torch, torch.distributed as dist, aem_kernels as ak
        from aem_kernels.distributed import (vocab_parallel_fused_linear_logprobs_and_entropy,
                                             vocab_parallel_logprobs_and_entropy)
        x = torch.randn(2, 5, 33, requires_grad=True); y = torch.randint(0, 33, (2, 5))
        h, w = torch.randn(10, 6, requires_grad=True), torch.randn(33, 6, requires_grad=True)
        tr = torch.tensor([[0, 0, 1, 1, -1], [2, 2, 2, -1, 3]]); rg = torch.tensor([0, 0, 1, 1])
        cfg = ak.AEMConfig(surprisal_source="old", entropy_coef=0.01)
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        for backend in ("auto", "cpu", "torch", "triton"):
            lp, ent = ak.logprobs_and_entropy(x, y, backend=backend)
            (lp.sum() + ent.sum()).backward()
            ak.logprobs_from_logits(x, y, backend=backend).sum().backward()
            ak.logprobs_from_logits(x, torch.randint(0, 33, (2, 5, 3)), backend=backend).sum().backward()
            ak.entropy_from_logits(x.detach(), backend=backend)
            lp, ent = ak.fused_linear_logprobs_and_entropy(h, w, y.view(-1), backend=backend)
            (lp.sum() + ent.sum()).backward()
            for single in (False, True):
                loss, _ = ak.aem_policy_loss(x, y, torch.randn(4), token_response=tr, response_group=rg,
                                             old_entropy=torch.rand(2, 5), config=cfg, backend=backend,
                                             single_pass=single and backend == "triton")
                loss.backward()
                loss, _ = ak.fused_linear_aem_policy_loss(h, w, y.view(-1), torch.randn(4),
                                                          token_response=tr.view(-1), response_group=rg,
                                                          old_entropy=torch.rand(10), config=cfg, backend=backend,
                                                          single_pass=single and backend != "triton")
                loss.backward()
            lp, ent = vocab_parallel_logprobs_and_entropy(x, y, backend=backend)
            (lp.sum() + ent.sum()).backward()
            lp, ent = vocab_parallel_fused_linear_logprobs_and_entropy(h, w, y.view(-1), backend=backend)
            (lp.sum() + ent.sum()).backward()
        ak.response_entropy(ent.detach().view(2, 5), tr, 4); ak.response_surprisal(lp.detach().view(2, 5), tr, 4)
        dist.destroy_process_group()
        oracles = [m for m in sys.modules if m.startswith("aem_kernels") and "naive" in m.split(".")]
        assert not oracles, f"production code imported the oracles {{oracles}}"
        print("ok")
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_no_module_imports_another_modules_private_names():
    known = known_package_modules()
    offenders = {m: hits for m, (text, pkg) in sources("aem_kernels").items()
                 if (hits := private_imports(text, m, pkg, known))}
    assert not offenders, offenders


def test_bench_imports_nothing_private_of_the_package():
    known = known_package_modules()
    offenders = {m: hits for m, (text, pkg) in sources("bench").items()
                 if (hits := private_imports(text, m, pkg, known))}
    assert not offenders, offenders


@pytest.mark.parametrize("tree", list(TREES))
def test_no_import_circle(tree):
    assert cycles(import_graph(sources(tree), compiled_modules(tree))) == []


def test_test_modules_never_import_test_modules():
    assert imported_test_modules("from test_distributed import Mismatches", "test_x") == ["test_distributed"]
    assert imported_test_modules("from bench import test_bench_ops", "bench.x") == ["bench.test_bench_ops"]
    assert imported_test_modules("from distributed_harness import Checks\nimport helpers", "test_x") == []
    offenders = {module: hits for tree in ("python_tests", "bench") for module, (text, pkg) in sources(tree).items()
                 if (hits := imported_test_modules(text, module, pkg))}
    assert not offenders, offenders


OP_FOLDERS = sorted(p for p in (PACKAGE / "ops").iterdir() if (p / "__init__.py").exists())


@pytest.mark.parametrize("folder", OP_FOLDERS, ids=lambda p: p.name)
def test_each_op_folder_has_its_oracle_and_its_path_decision(folder):
    assert (folder / "naive.py").exists(), f"ops/{folder.name}/ has no naive.py (the op's definition and oracle)"
    assert folder.name in DECISIONS, f"ops/{folder.name}/: which function is its path decision?"
    tree = ast.parse((folder / "__init__.py").read_text())
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert DECISIONS[folder.name] in defined, f"ops/{folder.name}/__init__.py does not define its decision"


def test_each_path_decision_is_defined_once():
    places = {}
    for module, (text, _) in sources("aem_kernels").items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name in DECISIONS.values():
                places.setdefault(node.name, []).append(module)
    assert places == {name: [f"aem_kernels.ops.{op}"] for op, name in DECISIONS.items()}


def test_import_aem_kernels_loads_no_framework_trainer_or_benchmark():
    code = """
        import sys, aem_kernels
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("verl", "trl", "transformers", "ray",
                        "liger_kernel", "cut_cross_entropy", "bench", "matplotlib", "pytest")
                        or m.startswith(("aem_kernels.train", "aem_kernels.integrations", "aem_kernels.demo"))
                        or (m.startswith("aem_kernels") and "naive" in m.split(".")))
        print(loaded)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


# ---- the decisions route as documented ------------------------------------------------------------------------

def test_backend_decision_routes_by_device_and_dtype():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cuda, torch.float64).name == "torch"   # fp32-math kernels: not fp64
    if capability.TRITON_FOUND:
        assert resolve_backend("auto", cuda, torch.bfloat16).name == "triton"
        # the CUDA plan: cuBLAS half-precision products with fp32 output per row chunk, Triton row kernels
        expected = "triton-chunked-tc" if capability.half_mm_fp32_out("cuda") else "triton-blocked"
        assert resolve_fused_linear_path("auto", cuda, torch.bfloat16).key == expected
    # the fused-linear path follows the row backend: vocab blocks for bf16/fp16 (no fp32 weight copy), row chunks
    # for fp32/fp64, and fp64 never on the Triton tiles
    assert resolve_fused_linear_path("torch", cpu, torch.bfloat16).key == "torch-blocked"
    assert resolve_fused_linear_path("torch", cpu, torch.float32).key == "torch-chunked"
    assert resolve_fused_linear_path("auto", cuda, torch.float64).key == "torch-chunked"
    if capability.cpu_extension() is not None:
        assert resolve_backend("auto", cpu, torch.float64).name == "cpu"   # C++ computes fp64 in fp64
    assert resolve_backend("auto", torch.device("meta"), torch.float32).name == "torch"
    with pytest.raises(ak.BackendUnavailableError, match="fp32.*fp64.*auto"):
        resolve_backend("triton", cuda, torch.float64)
    with pytest.raises(ak.BackendUnavailableError, match="CPU tensors"):
        resolve_backend("cpu", cuda, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("gpu", cpu)
    assert issubclass(ak.BackendUnavailableError, RuntimeError)


def _probe(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


def test_available_backends_never_warns_and_auto_warns_once_on_fallback():
    code = """
        import warnings, torch, aem_kernels as ak
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # asking, or naming an unavailable backend, never warns
            reasons = ak.available_backends("cpu"); ak.available_backends("cpu", torch.float64)
            assert "AEM_KERNELS_DISABLE_CPU_EXT" in reasons["cpu"] and reasons["torch"] is None, reasons
            try:
                ak.entropy_from_logits(torch.randn(3, 7), backend="cpu")
                raise SystemExit("no BackendUnavailableError")
            except ak.BackendUnavailableError as exc:
                assert "AEM_KERNELS_DISABLE_CPU_EXT" in str(exc)
        x, y = torch.randn(4, 9), torch.randint(0, 9, (4,))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            lp, h = ak.logprobs_and_entropy(x, y); ak.entropy_from_logits(x); ak.logprobs_from_logits(x.double(), y)
        texts = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
        assert len(texts) == 1 and '"auto" uses the torch backend for cpu tensors' in texts[0], texts
        expected = ak.logprobs_and_entropy(x, y, backend="torch")
        assert torch.equal(lp, expected[0]) and torch.equal(h, expected[1])
        print("ok")
    """
    proc = _probe(code, AEM_KERNELS_DISABLE_CPU_EXT="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]


def test_triton_capabilities_are_declared_without_importing_triton():
    code = """
        import sys, torch, aem_kernels as ak
        reasons = ak.available_backends("cpu", torch.float64)
        assert "fp64" in reasons["triton"], reasons
        assert "triton" not in sys.modules, "asking for capabilities imported Triton"
        print("ok")
    """
    proc = _probe(code, TRITON_INTERPRET="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]


# ---- validation in one place, the README ----------------------------------------------------------------------

def test_config_backend_and_mask_checks_name_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.AEMLoss(backend="gpu")
    with pytest.raises(TypeError, match="config must be an AEMConfig, got dict"):
        ak.AEMLoss(config={"beta": 1.0})
    with pytest.raises(TypeError, match="config must be an AEMConfig"):
        ak.modulate_advantages(torch.ones(2), torch.ones(2), torch.zeros(2, dtype=torch.long), config=None)
    with pytest.raises(TypeError, match="config must be an AEMConfig"):
        ak.aem_weights(torch.ones(2), torch.zeros(2, dtype=torch.long), "paper", num_groups=1)
    with pytest.raises(ValueError, match="response_valid must be a bool tensor of shape \\(2,\\)"):
        ak.modulate_advantages(torch.ones(2), torch.ones(2), torch.zeros(2, dtype=torch.long),
                               response_valid=torch.ones(2))
    logits, labels = torch.randn(2, 4, 11), torch.randint(0, 11, (2, 4))
    common = dict(response_group=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="response_mask must hold only 0 and 1"):
        ak.aem_policy_loss(logits, labels, torch.ones(2), response_mask=torch.full((2, 4), 0.5), **common)
    with pytest.raises(ValueError, match="response_mask must have shape \\(2, 4\\)"):
        ak.aem_policy_loss(logits, labels, torch.ones(2), response_mask=torch.ones(2, 3), **common)
    with pytest.raises(TypeError, match="single_pass must be None or a bool, got int"):
        ak.aem_policy_loss(logits, labels, torch.ones(2), response_mask=torch.ones(2, 4), single_pass=1, **common)
    with pytest.raises(ValueError, match="advantage_level must be one of"):
        ak.aem_policy_loss(logits, labels, torch.ones(2), response_mask=torch.ones(2, 4), advantage_level="x",
                           **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "auto" may warn once that it falls back to torch
        loss, _ = ak.aem_policy_loss(logits, labels, torch.ones(2),
                                     response_mask=torch.ones(2, 4, dtype=torch.int64), **common)
    assert torch.isfinite(loss)   # 0/1 integer masks (as verl passes them) are accepted


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def _declared_all(path: pathlib.Path) -> list:
    """`__all__` of a module, read from its source (the integrations import their frameworks)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} has no __all__")


@pytest.mark.parametrize("module", ["__init__.py", "distributed.py", "integrations/__init__.py",
                                    "integrations/verl/__init__.py", "integrations/trl.py"])
def test_readme_api_table_lists_every_public_name(module):
    api = _readme_section("API")
    missing = [name for name in _declared_all(PACKAGE / module)
               if not any(f"`{prefix}{name}" in api for prefix in ("", "aem_kernels.distributed.",
                                                                  "aem_kernels.integrations.",
                                                                  "aem_kernels.integrations.trl."))
               and f" `{name}`" not in api and f"`{name}(" not in api and f"`{name}`" not in api]
    assert not missing, f"README API table lacks {missing} of {module}"


def test_readme_layout_names_every_module():
    layout = _readme_section("Layout")
    names = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    names += [p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    names += [f"ops/{p.name}/" for p in OP_FOLDERS] + [p.name for p in (PACKAGE / "ops").glob("*.py")
                                                      if p.name != "__init__.py"]
    names += [p.name for folder in OP_FOLDERS + [PACKAGE / "loss"] for p in folder.glob("*.py")
              if p.name != "__init__.py"]
    missing = [name for name in sorted(set(names)) if f"`{name}" not in layout and f"{name}`" not in layout]
    assert not missing, f"README Layout section lacks {missing}"
